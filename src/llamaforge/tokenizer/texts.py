"""The texts bundled with llamaforge (data/*.txt) and the test sentence of the original merge script."""

from __future__ import annotations

from importlib import resources

# The test sentence of the original merge script.
TEST_SENTENCE = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "The primary use of LLaMA is research on large language models, including"
)


def bundled_text(name: str) -> str:
    return resources.files("llamaforge").joinpath("data", name).read_text(encoding="utf-8")
