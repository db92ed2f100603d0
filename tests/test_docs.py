"""Every ```python example of README.md and docs/*.md runs as written, on the CPU.

The blocks of one file run in order in one namespace (a later block may use what an earlier one defined), in a
temporary working directory that holds the one checkpoint the examples name: a tiny Llama written as a
compressed-tensors FP8_DYNAMIC checkpoint under the directory name `Llama-3.1-8B-Instruct-FP8`. Shell commands and
code that needs a GPU or a real checkpoint are fenced as ```bash or ```text and not run. An example that raises
fails its file's test, naming the block.
"""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CHECKPOINT = "Llama-3.1-8B-Instruct-FP8"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return _BLOCK.findall(f.read())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding the checkpoint the examples load, written the way llm-compressor writes one."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    pytest.importorskip("compressed_tensors")
    import transformers
    from test_checkpoints import llama_config, write_ct

    root = tmp_path_factory.mktemp("docs")
    torch.manual_seed(0)
    src = str(root / "bf16")
    transformers.LlamaForCausalLM(llama_config(tie=False)).to(torch.bfloat16).save_pretrained(src)
    write_ct(src, str(root / CHECKPOINT), "FP8_DYNAMIC", torch.randint(0, 256, (1, 8)))
    return root


def test_pages_found():
    """The README and the docs pages are where this test looks, and the README has its three examples."""
    assert len(PAGES) > 1, PAGES
    assert len(python_blocks(PAGES[0])) >= 3


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_examples_run(path, workdir, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{os.path.relpath(path, ROOT)} has no python examples")
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        where = f"{os.path.relpath(path, ROOT)}, python block {i + 1}"
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the examples are this repository's own text
