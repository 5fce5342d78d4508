"""formats.gguf_tensors: the GGUF tensor table and scalar keys read past the arrays, against gguf-py's
reader on files gguf-py's writer made (every value type, string arrays, quantized tensors)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llamaforge.export.quantize import bits_per_weight, header_string, tensor_types  # noqa: E402
from llamaforge.formats.gguf_tensors import GGUFHeaderError, read_header  # noqa: E402


def _write(path, n_tokens=3000):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.context_length", 4096)
    w.add_int32("t.i32", -7)
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -300)
    w.add_uint64("t.u64", 2**40 + 3)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", -1.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "名字 name")
    w.add_token_list([f"tok{i}" if i % 7 else "词" * (i % 5) for i in range(n_tokens)])
    w.add_token_scores([float(i) for i in range(n_tokens)])
    w.add_array("t.ints", [1, 2, 3])
    w.add_uint32("general.file_type", 7)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((64, 256)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("norm", rng.standard_normal(17).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tensor_table_and_scalars_equal_gguf_py(tmp_path):
    path = _write(tmp_path / "t.gguf")
    r = gguf.GGUFReader(path)
    h = read_header(path)
    want = [(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset) - r.data_offset,
             int(t.n_bytes), int(t.n_elements)) for t in r.tensors]
    got = [(t.name, t.type, t.shape, t.offset, t.n_bytes, t.n_elements) for t in h.tensors]
    assert got == want and [t[0] for t in got] == ["a.weight", "b.weight", "c.weight", "norm"]
    assert [t.type_name for t in h.tensors] == ["F32", "F16", "Q8_0", "F32"]
    assert h.tensors[2].shape == (64, 8)  # fastest dimension first, as the file (and gguf-py) list it
    scalars = {k: f.contents() for k, f in r.fields.items()
               if f.types[0] != gguf.GGUFValueType.ARRAY and not k.startswith("GGUF.")}  # gguf-py's own
    assert set(h.scalars) == set(scalars)  # no array key (tokens, scores, t.ints) among them
    for k, v in scalars.items():
        got = h.scalars[k].decode("utf-8") if isinstance(h.scalars[k], bytes) else h.scalars[k]
        assert got == pytest.approx(v) if isinstance(v, float) else got == v, k
    assert h.scalars["t.u64"] == 2**40 + 3 and h.scalars["t.i16"] == -300 and h.scalars["t.bool"] is True
    assert header_string(path, "t.str") == "名字 name" and header_string(path, "absent") is None
    assert tensor_types(path)["c.weight"] == ("Q8_0", (64, 8))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    assert bits_per_weight(path) == (8 * nbytes / sum(int(t.n_elements) for t in r.tensors), nbytes,
                                     64 * 256 + 96 + 512 + 17)


@pytest.mark.parametrize("cut", [3, 23, 200, 30000])
def test_a_truncated_or_foreign_header_is_refused_not_misread(tmp_path, cut):
    data = _write(tmp_path / "t.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFHeaderError):
        read_header(bad)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFHeaderError, match="magic"):
        read_header(tmp_path / "x.gguf")
