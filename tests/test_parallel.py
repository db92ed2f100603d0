"""fp8kern.parallel on torch.distributed with gloo: W processes spawned from pytest (W = 2, 3, 4), each checking
its shard of a tiny Llama in every scheme against the single-device model (tests/parallel_worker.py says what
and how). Block-scaled shards here are not multiples of 128 (q/k/v rows split into 64 or 48, the MLP's 320 into
160, 107 or 80)."""

from __future__ import annotations

import importlib.util
import multiprocessing

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import parallel_worker  # noqa: E402

TIMEOUT_S = 600


def spawn(world: int, tmp_path, job: str, *extra) -> list[str]:
    """Run parallel_worker.<job> on world spawned gloo ranks; their report lines, or the first rank's error."""
    ctx = multiprocessing.get_context("spawn")
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=parallel_worker.rank_main, args=(r, world, init, str(tmp_path), job, *extra))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [open(tmp_path / f"rank{r}.err").read() for r in range(world) if (tmp_path / f"rank{r}.err").exists()]
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s (a collective hung?); errors: {errors}"
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]} without an error file"
    for r in range(world):  # said, not failed: the checks passed before the group was torn down
        if (tmp_path / f"rank{r}.teardown").exists():
            print(f"rank {r} teardown: {open(tmp_path / f'rank{r}.teardown').read()}")
    return [open(tmp_path / f"rank{r}.ok").read() for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tensor_parallel_llama(tmp_path, world):
    reports = spawn(world, tmp_path, "dense_job")
    assert len(reports) == world and all(len(r.splitlines()) == len(parallel_worker.CASES) for r in reports)
    print(f"W={world}:\n{reports[0]}")


def test_no_process_group():
    import fp8kern

    model = parallel_worker.build(parallel_worker.llama(), "dynamic_per_token")[0]
    with pytest.raises(RuntimeError, match="needs an initialized default process group"):
        fp8kern.parallel.shard_model(model, tp_size=2)


def test_from_pretrained_checks_before_reading(checkpoints, monkeypatch):
    """Without a process group, from_pretrained(tp_size=...) fails before it opens the checkpoint."""
    import fp8kern
    from fp8kern.checkpoints import loader

    monkeypatch.setattr(loader, "open_format", lambda *a, **k: pytest.fail("read the checkpoint"))
    with pytest.raises(RuntimeError, match="needs an initialized default process group"):
        fp8kern.from_pretrained(checkpoints["grok2"], tp_size=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama (12 heads, 12 KV heads, MLP 320) in several formats, written as test_checkpoints writes them."""
    import torch
    import transformers

    import test_checkpoints as tc

    root = tmp_path_factory.mktemp("tp-ckpts")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(parallel_worker.llama()).to(torch.bfloat16)
    with torch.no_grad():
        for n in tc.QUANT:
            w = model.get_submodule(n).weight
            w.mul_(torch.exp2(torch.rand(w.shape[0], 1) * 6 - 3) * torch.exp2(torch.rand(1, w.shape[1]) * 2 - 1))
    src = str(root / "bf16")
    model.save_pretrained(src)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    writers = {"fp8-block-3-shards": lambda d: tc.write_fp8_block(src, d, torch.float32, 3),
               "quark-int4-fp8-static": lambda d: tc.write_quark_int4_fp8(src, d, ids, static=True),
               "fp8-tensor-static": lambda d: tc.write_fp8_tensor(src, d, True, ids),
               "grok2": lambda d: tc.write_grok2(src, d)}
    if importlib.util.find_spec("compressed_tensors"):
        writers["ct-fp8-dynamic"] = lambda d: tc.write_ct(src, d, "FP8_DYNAMIC", ids)
    if importlib.util.find_spec("torchao"):
        writers["torchao-row"] = lambda d: tc.write_torchao(src, d, "row")
    out = {}
    for name, write in writers.items():
        write(str(root / name))
        out[name] = str(root / name)

    # MoE checkpoints (12 experts of intermediate size 160) in every format the loader reads MoE experts in, written
    # as test_experts writes them, with the configs of parallel_worker; one whose experts are kept in bf16; the
    # done-when checkpoint of issue 26.
    import json
    import shutil

    import test_experts as tx

    pw = parallel_worker
    moe = [(f"moe-{v}", v, {}, None) for v in pw.MOE_LOADS] + [
        ("moe-qwen3-ct-fp8-dynamic-bf16-experts", "qwen3-ct-fp8-dynamic", {}, r".*\.experts\."),
        (pw.DONE_WHEN, "qwen3-fp8-block", {"experts": 4, "hidden": 256}, None)]
    saved = dict(tx.ARCHS)
    try:
        for name, variant, kw, keep in moe:
            arch = variant.split("-")[0]
            tx.ARCHS[arch] = (lambda arch=arch, kw=kw: pw.moe_config(arch, inter=pw.MOE_INTER, **kw), saved[arch][1])
            out[name] = tx.write_moe(str(root / name), variant, ids, keep=keep)[1]
    finally:
        tx.ARCHS.clear()
        tx.ARCHS.update(saved)
    # Experts of 1 row, narrower than any W: the config alone decides the refusal, before any tensor is read.
    narrow = str(root / "moe-qwen3-fp8-block-narrow")
    shutil.copytree(out["moe-qwen3-fp8-block"], narrow)
    with open(f"{narrow}/config.json") as f:
        cfg = json.load(f)
    with open(f"{narrow}/config.json", "w") as f:
        json.dump({**cfg, "moe_intermediate_size": 1}, f)
    out["moe-qwen3-fp8-block-narrow"] = narrow
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_from_pretrained_tensor_parallel(tmp_path, checkpoints, world):
    """from_pretrained(tp_size=W) on every rank, MoE checkpoints with tensor-parallel experts and (some) with
    ep_size=W too: the same shard as loading whole and sharding in memory, byte for byte, with each planned weight
    and each expert weight read as the rank's rows or columns only and no other rank's expert read at all (a probe
    records every read), the bytes tools/tp_memory.py counts, and the logits of the whole model on every rank
    (tests/parallel_worker.py: run_load); experts that cannot be split refused before any read."""
    loads = parallel_worker.loads_at(world, checkpoints)
    reports = spawn(world, tmp_path, "load_job", checkpoints, loads)
    assert all(len(r.splitlines()) == len(loads) for r in reports)
    print(f"W={world}:\n" + "\n".join(reports))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_expert_parallel_moe(tmp_path, world):
    """Qwen3-MoE and DeepSeek-V3 with tp_size = ep_size = W: every experts layer (uneven routing, one expert that
    receives no token) and every tensor-parallel layer within its derived bound (tests/parallel_worker.py)."""
    reports = spawn(world, tmp_path, "moe_job")
    assert all(len(r.splitlines()) == len(parallel_worker.MOE_CASES) for r in reports)
    print(f"W={world}:\n" + reports[0])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tensor_parallel_experts(tmp_path, world):
    """Qwen3-MoE and DeepSeek-V3 with tp_size = W and no ep_size: every expert's intermediate rows split over the
    ranks (160 into 80; 54 / 53 / 53; 40), each experts layer's FP8 down inputs bit for bit one device's and its
    output within the derived bound, on the model's routing and on routings where most experts, or all, receive no
    token (tests/parallel_worker.py: check_tp_experts_layer); too narrow experts refused before any change."""
    reports = spawn(world, tmp_path, "tp_experts_job")
    assert all(len(r.splitlines()) == len(parallel_worker.TP_EXPERTS_CASES) for r in reports)
    print(f"W={world}:\n" + reports[0])
