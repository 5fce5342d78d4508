"""llama.cpp's own command-line tools (`llama-imatrix`, `llama-quantize`), built once with CMake from
the llama.cpp tree that the installed llama-cpp-python's sdist vendors, so the quantizer, the loader
and the tests stay one llama.cpp version; cached per version, as pip caches a wheel.

  cache:  $LLAMAFORGE_TOOLS_DIR, else ~/.cache/llamaforge/llama.cpp-tools
  build:  {cache}/{llama-cpp-python version}/bin/llama-imatrix, .../llama-quantize, BUILD.json

A build is finished when its folder holds BUILD.json: it is built in a sibling `.part` folder that
is renamed into place only once both tools ran `--help`, so a killed build is never taken for a
finished one (and is started again). llama-cpp-python cannot pass an importance matrix to its
quantizer binding through Python, hence the tools.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import LlamaforgeError

TOOLS = ("llama-imatrix", "llama-quantize")
BUILD_COMMAND = "python scripts/build_tools.py"
# only the two tools and the static libraries they link: no tests, examples, server, HTTPS, curl
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_SUBPROCESS=OFF",
)
STAMP = "BUILD.json"


def installed_version() -> str | None:
    """The installed llama-cpp-python's version (from its metadata; nothing imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (the tools are built from its sdist)."""
    found = installed_version()
    if found is None:
        raise LlamaforgeError("llama.cpp's tools are built from the installed llama-cpp-python's source, and "
                              "llama-cpp-python is not installed", None, "pip install 'llamaforge[gguf]'")
    return found


def tools_root() -> Path:
    """The cache of built tools: $LLAMAFORGE_TOOLS_DIR, else ~/.cache/llamaforge/llama.cpp-tools."""
    env = os.environ.get("LLAMAFORGE_TOOLS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llamaforge" / "llama.cpp-tools"


def build_dir(version: str | None = None) -> Path:
    """The folder of one version's build (finished when it holds BUILD.json)."""
    return tools_root() / (version or llama_cpp_version())


def stamp_path(version: str | None = None) -> Path:
    """BUILD.json of the installed version's build: what the workflow's build rule makes."""
    return build_dir(version) / STAMP


def built(version: str | None = None) -> bool:
    """Whether the tools of this llama-cpp-python version are built (finished) in the cache."""
    d = build_dir(version)
    return (d / STAMP).is_file() and all(os.access(d / "bin" / t, os.X_OK) for t in TOOLS)


def tool(name: str) -> str:
    """The path of one built tool, or one line saying how to build it."""
    version = llama_cpp_version()
    if not built(version):
        raise LlamaforgeError(f"llama.cpp's {name} (llama-cpp-python {version}'s llama.cpp) is not built",
                              build_dir(version), f"build the tools once: {BUILD_COMMAND} (CMake and a C++ "
                              "compiler; up to 11 minutes on 2 cores, once)")
    return os.fspath(build_dir(version) / "bin" / name)


def missing_build_tools() -> list[str]:
    """What of cmake and a C/C++ compiler this machine lacks (empty when a build can run)."""
    need = {"cmake": ["cmake"], "a C compiler": ["cc", "gcc", "clang"], "a C++ compiler": ["c++", "g++", "clang++"]}
    env = {"a C compiler": os.environ.get("CC"), "a C++ compiler": os.environ.get("CXX")}
    return [what for what, names in need.items()
            if not (env.get(what) and shutil.which(env[what])) and not any(shutil.which(n) for n in names)]


def _pkg_version(folder: Path) -> str | None:
    """The Version: of an unpacked sdist's PKG-INFO (None without one: a bare llama.cpp tree)."""
    try:
        text = (folder / "PKG-INFO").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Version:")), None)


def _check_version(version: str, source: Path, found: str | None) -> None:
    """The tools must be the installed llama-cpp-python's llama.cpp: a source of another version (or of
    none that can be told) is one line, since its build would be cached as this version's."""
    if found != version:
        what = f"llama-cpp-python {found}'s source" if found else "a source whose llama-cpp-python version is unknown"
        raise LlamaforgeError(f"this is {what}, and the installed llama-cpp-python is {version}", source,
                              f"give llama-cpp-python {version}'s sdist (llama_cpp_python-{version}.tar.gz) or its "
                              "unpacked folder (with PKG-INFO), or leave --source out for pip to fetch it")


def _sdist(version: str, tmp: Path, source: str | os.PathLike | None) -> Path:
    """The sdist's vendor/llama.cpp, from SOURCE (an sdist .tar.gz or an unpacked tree) or pip."""
    if source is not None:
        src = Path(source)
        if src.is_dir():
            _check_version(version, src, _pkg_version(src))
            for cand in (src / "vendor" / "llama.cpp", src):
                if (cand / "tools" / "quantize").is_dir() and (cand / "ggml").is_dir():
                    return cand
            raise LlamaforgeError("this folder holds no llama.cpp source tree (tools/quantize, ggml/)", src,
                                  f"give llama-cpp-python {version}'s sdist (.tar.gz) or its unpacked folder")
        archive = src
        if not archive.is_file():
            raise LlamaforgeError("no such file", archive, f"give llama-cpp-python {version}'s sdist (.tar.gz)")
    else:  # pip's own route, with its index and cache settings
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                              f"llama-cpp-python=={version}", "-d", os.fspath(tmp)], stdout=sys.stderr)
        found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not found:
            raise LlamaforgeError(f"pip could not download llama-cpp-python {version}'s source", None,
                                  "check the network, or give the sdist: --source llama_cpp_python-VERSION.tar.gz")
        archive = found[0]
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/" and (m.isfile() or m.isdir())]
        if not members:
            raise LlamaforgeError("this archive holds no vendor/llama.cpp", archive,
                                  f"give llama-cpp-python {version}'s sdist (.tar.gz)")
        top = members[0].name.split("/", 1)[0]
        _check_version(version, archive, top.removeprefix("llama_cpp_python-") if top.startswith("llama_cpp_python-")
                       else None)
        # the "data" filter (no links out, no devices) where this Python has it (3.10.12+, 3.11.4+)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "src", members=members, **safe)
    return next((tmp / "src").glob("*/vendor/llama.cpp"))


def build_tools(source: str | os.PathLike | None = None, jobs: int = 2, echo=print) -> Path:
    """Build llama-imatrix and llama-quantize of the installed llama-cpp-python's llama.cpp into the
    cache (nothing to do when built); return the build folder."""
    version = llama_cpp_version()
    final = build_dir(version)
    if built(version):
        echo(f"llama.cpp's tools of llama-cpp-python {version} are built: {final}")
        return final
    lacking = missing_build_tools()
    if lacking:
        raise LlamaforgeError(f"building llama.cpp's tools needs {' and '.join(lacking)}, not found on PATH", None,
                              "install them (e.g. apt-get install cmake build-essential), then run "
                              f"{BUILD_COMMAND}")
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{version}.", suffix=".part", dir=final.parent) as t:
        tmp = Path(t)
        tree = _sdist(version, tmp, source)
        cmake = shutil.which("cmake")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        log = tmp / "build.log"
        echo(f"building llama.cpp's {', '.join(TOOLS)} of llama-cpp-python {version} with {jobs} job(s) "
             f"(up to 11 minutes on 2 cores; a failed build's log is kept as {final.parent / 'build.log'}) ...")
        with open(log, "wb") as f:
            steps = [[cmake, "-S", os.fspath(tree), "-B", os.fspath(tmp / "build"), *gen, *CMAKE_FLAGS],
                     [cmake, "--build", os.fspath(tmp / "build"), "--target", *TOOLS, "-j", str(jobs)]]
            for cmd in steps:
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    shutil.copyfile(log, final.parent / "build.log")
                    raise LlamaforgeError("the CMake build of llama.cpp's tools failed", final.parent / "build.log",
                                          "read its last lines; check the compiler (C++17) and CMake (>= 3.14)")
        part = tmp / "out"
        (part / "bin").mkdir(parents=True)
        for name in TOOLS:
            exe = next(p for p in (tmp / "build" / "bin" / name, tmp / "build" / name) if p.is_file())
            shutil.copy2(exe, part / "bin" / name)
            if subprocess.run([part / "bin" / name, "--help"], capture_output=True).returncode < 0:  # SIGILL ...
                raise LlamaforgeError(f"the built {name} does not run on this machine", final.parent,
                                      "report it with the output of: " + os.fspath(part / "bin" / name))
        seconds = time.monotonic() - start
        info = {"llama-cpp-python": version, "tools": list(TOOLS), "cmake_flags": list(CMAKE_FLAGS),
                "jobs": jobs, "seconds": round(seconds, 1)}
        (part / STAMP).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # an unfinished build (no BUILD.json): replaced whole
            shutil.rmtree(final)
        os.replace(part, final)
    echo(f"built {', '.join(TOOLS)} in {seconds / 60:.1f} minutes: {final}")
    return final


def run_tool(name: str, args: list[str], what: str, path: str | os.PathLike, fix: str, echo=print) -> None:
    """Run one built tool with ARGS, its output passed through to our stderr when it succeeds; when it
    fails, one line: its last line of output, and where its whole log was kept (a temporary file)."""
    exe = tool(name)
    cmd = [exe, *[os.fspath(a) for a in args]]
    echo("running " + " ".join(cmd))
    got = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = got.stdout.decode("utf-8", "replace")
    if got.returncode != 0:
        import tempfile

        last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), "no output")
        fd, log = tempfile.mkstemp(prefix=f"llamaforge-{name}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(" ".join(cmd) + "\n" + out)
        raise LlamaforgeError(f"{name} failed ({what}, exit status {got.returncode}: {last[:160]}; its log: {log})",
                              path, fix)
    sys.stderr.write(out)
