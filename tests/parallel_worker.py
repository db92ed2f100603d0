"""The rank side of tests/test_parallel.py: run by spawned processes (gloo on the CPU), each checking its shard.

Every rank builds the same tiny Llama (same seed), quantizes it with fp8kern.quantize_model, keeps a copy as the
single-device model, shards the other with fp8kern.parallel.shard_model, and checks, per scheme:
- every sharded layer against the single-device layer on the same input, within the bound derived in
  check_layer (same FP8 operands on both sides; only the fp32 summation order and the final rounding differ);
- the logits: identical bit for bit on every rank, and close to the single-device logits (a sanity check: the
  per-layer bound is the exact claim, and small differences grow through the network's nonlinearities);
- the errors a bad configuration gets, before the model is touched.
A failure raises; the parent sees the exit code and the traceback file.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import traceback

import torch
import torch.distributed as dist


def logits_and_io(model, single, ids, modules: dict):
    """(logits of the sharded model, of the single-device one, {name: (inputs..., output)} of `modules` in the sharded
    model's forward)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (*a, out)))
             for n, m in modules.items()]
    try:
        with torch.no_grad():
            return model(ids).logits, single(ids).logits, seen
    finally:
        for h in hooks:
            h.remove()



def expect_out_of_range_refused(layer, x, idx, w) -> None:
    """An expert index outside [0, 12] is an error on one device, so on every rank too."""
    bad = idx.clone()
    bad[0, 0] = 13
    try:
        layer(x, bad, w)
    except ValueError as e:
        assert "outside" in str(e), str(e)
    else:
        raise AssertionError("an expert index outside [0, 12] did not raise")

def llama(heads: int = 12, kv_heads: int = 12, arch: str = "llama"):
    """A tiny Llama; arch 'phi3': the same sizes as Phi-3, whose fused qkv_proj and gate_up_proj the plan shards
    with gathered outputs."""
    import transformers

    if arch == "phi3":
        return transformers.Phi3Config(hidden_size=16 * heads, intermediate_size=320, num_hidden_layers=2,
                                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256,
                                       max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    return transformers.LlamaConfig(hidden_size=16 * heads, intermediate_size=320, num_hidden_layers=2,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256,
                                    max_position_embeddings=64, tie_word_embeddings=False)


def build(config, scheme: str, scale_format: str = "fp32"):
    import transformers

    import fp8kern

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # rows and columns of very different sizes: a misplaced scale shows
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(torch.exp2(torch.rand(p.shape[0], 1) * 4 - 2) * torch.exp2(torch.rand(1, p.shape[1]) * 2 - 1))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = {"scale_format": scale_format} if scheme == "block128" else {}
    calib = [ids] if scheme == "static_per_tensor" else None
    fp8kern.quantize_model(model, scheme, calibration_data=calib, **kw)
    return model.eval(), ids


def dequantized_operands(layer, x: torch.Tensor):
    """float64 (A, B): the single-device layer's quantized input and weight, dequantized (what its GEMM sums)."""
    import fp8kern
    from fp8kern import reference

    x2 = x.reshape(-1, x.shape[-1])
    if layer.scheme == "block128":
        q, s = fp8kern.quantize(x2, "group", scale_format=layer.scale_format)
        A = reference.dequantize(q, s, block_size=(1, 128))
        B = reference.dequantize(layer.weight, layer.weight_scale, block_size=(128, 128))
    else:
        q, s = (fp8kern.quantize(x2, layer.act_granularity) if layer.dynamic
                else fp8kern.quantize(x2, "tensor", scale=layer.input_scale))
        A = reference.dequantize(q, s)
        B = reference.dequantize(layer.weight, layer.weight_scale)
    return A.double(), B.double()


def check_layer(name, single, sharded, x_full, y, world):
    """|y_tp - y_1| <= 2 gamma_{K+W+4} (|A| |B|^T) + 2^-7 max(|y_1|, |y_tp|) + 2^-133 elementwise.

    Both sides sum the same products a_k b_k (same FP8 values and scales: the column shard quantizes the whole
    input as one device does, the row shard uses the single-device scales), in fp32, in different orders and
    groupings (W partial sums, then their sum; the scales and the bias applied around them): each result is within
    gamma_{K+W+4} sum_k |a_k b_k| of the exact sum (gamma_m = m u / (1 - m u), u = 2^-24), so they differ by at
    most twice that. Each is then rounded once to bf16 (8 significant bits: within 2^-8 of its value each, 2^-7
    together of the larger), plus half the bf16 subnormal step."""
    from fp8kern.parallel import ColumnParallel

    A, B = dequantized_operands(single, x_full)
    ref = single(x_full).reshape(-1, single.out_features)
    if isinstance(sharded, ColumnParallel) and not sharded.gather:
        r0, r1 = sharded.rows
        ref, B = ref[:, r0:r1], B[r0:r1]
    K = A.shape[1]
    m = K + world + 4
    gamma = m * 2.0**-24 / (1 - m * 2.0**-24)
    got = y.reshape(ref.shape).double()
    bound = 2 * gamma * (A.abs() @ B.abs().T) + 2.0**-7 * torch.maximum(got.abs(), ref.double().abs()) + 2.0**-133
    err = (got - ref.double()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{name}: |tp - single| = {float(err.flatten()[worst])} > bound "
                                        f"{float(bound.flatten()[worst])}")


def gather_features(x: torch.Tensor, bounds, group=None) -> torch.Tensor:
    """The whole input of a row-parallel layer from every rank's slice (features split by bounds)."""
    width = max(e - s for s, e in bounds)
    padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., : e - s] for p, (s, e) in zip(parts, bounds)], dim=-1)


def run_case(world: int, scheme: str, scale_format: str, match: bool, arch: str = "llama") -> str:
    import fp8kern
    from fp8kern.parallel import ColumnParallel, RowParallel

    model, ids = build(llama(arch=arch), scheme, scale_format)
    single = copy.deepcopy(model)
    fp8kern.parallel.shard_model(model, tp_size=world, match_single_device=match)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (ColumnParallel, RowParallel))}
    assert len(layers) == (8 if arch == "phi3" else 14), sorted(layers)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n, m in layers.items()]
    with torch.no_grad():
        got = model(ids).logits
        want = single(ids).logits
        for h in hooks:
            h.remove()
        if match:
            check_tp_layers(single, layers, {n: (v[0], v[-1]) for n, v in seen.items()}, world)
    cos = logits_agree(got, want, world, 0.9999 if match else 0.99)
    return (f"{arch} {scheme}/{scale_format}/match={match}: cosine {cos:.7f}, "
            f"max |diff| {float((got.double() - want.double()).abs().max()):.3g}")


def check_tp_layers(single, layers: dict, seen: dict, world: int) -> None:
    """check_layer for every sharded layer, on the (input, output) seen in the forward; a row shard's input is
    gathered from the ranks with the bounds it was cut with (heads for o_proj, any column for down_proj)."""
    from fp8kern.parallel import RowParallel, split_bounds

    for n, layer in layers.items():
        x, y = seen[n]
        if isinstance(layer, RowParallel) and not layer.split_input:
            unit = 16 if n.endswith("o_proj") else 1
            x = gather_features(x, split_bounds(layer.full_in_features, world, unit))
        check_layer(n, single.get_submodule(n), layer, x, y, world)


def logits_agree(got: torch.Tensor, want: torch.Tensor, world: int, min_cosine: float) -> float:
    """The logits are the same on every rank, bit for bit, and near the single-device ones (a sanity check: the
    per-layer bounds are the claim). Returns the cosine."""
    same = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(same, got)
    assert all(torch.equal(s, got) for s in same), "ranks returned different logits"
    a, b = got.double().flatten(), want.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos > min_cosine, f"logits cosine {cos}"
    return cos


def run_errors(world: int) -> None:
    import fp8kern

    model, _ = build(llama(), "dynamic_per_token")
    for kw, pattern in (({"tp_size": world + 1}, f"tp_size={world + 1} but the process group has {world} ranks"),
                        ({"plan": {"layers.*.mlp.experts": "moe_tp_experts"}}, None)):
        try:
            fp8kern.parallel.shard_model(model, **kw)
        except (ValueError, NotImplementedError) as e:
            assert pattern is None or pattern in str(e), str(e)
        else:
            raise AssertionError(f"shard_model({kw}) did not raise")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model, ids = build(llama(), "dynamic_per_token")
    single = copy.deepcopy(model)
    fp8kern.parallel.shard_model(model, device_mesh=mesh, tp_size=world)  # the mesh's group, its size checked
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fp8kern.parallel.shard_model(single, tp_size=world)(ids).logits)
    if world == 4:
        try:
            fp8kern.parallel.shard_model(build(llama(), "dynamic_per_token")[0],
                                         device_mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
        except ValueError as e:
            assert "device_mesh has 2 dimensions" in str(e), str(e)
        else:
            raise AssertionError("a 2-D mesh did not raise")
    if world == 4:  # 6 KV heads do not split over 4 ranks: refused before any layer is replaced
        model, _ = build(llama(heads=12, kv_heads=6), "dynamic_per_token")
        try:
            fp8kern.parallel.shard_model(model)
        except ValueError as e:
            assert "num_key_value_heads=6 is not divisible by the tensor-parallel size 4" in str(e), str(e)
        else:
            raise AssertionError("6 KV heads over 4 ranks did not raise")
        assert not any(type(m).__name__ in ("ColumnParallel", "RowParallel") for m in model.modules())


CASES = [("dynamic_per_token", "fp32", True), ("dynamic_per_tensor", "fp32", True), ("static_per_tensor", "fp32", True),
         ("block128", "fp32", True), ("block128", "ue8m0", True), ("block128", "fp32", False),
         ("static_per_tensor", "fp32", True, "phi3"), ("block128", "fp32", True, "phi3")]


def rank_main(rank: int, world: int, init_file: str, out_dir: str, job: str, *args) -> None:
    """A spawned rank: join the gloo group, run job (a function of this module returning report lines), write
    rank<r>.ok with the lines, or rank<r>.err with the traceback and exit 1."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        lines = globals()[job](world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.ok"), "w") as f:
            f.write("\n".join(lines))
        dist.barrier()  # every rank done before any tears the group down
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.exit(1)
    finally:
        if dist.is_initialized():
            try:  # a teardown error after the checks is noted, not a failure of what was checked
                dist.destroy_process_group()
            except Exception:
                with open(os.path.join(out_dir, f"rank{rank}.teardown"), "w") as f:
                    f.write(traceback.format_exc())


def dense_job(world: int) -> list[str]:
    lines = [run_case(world, *case) for case in CASES]
    run_errors(world)
    return lines


class ReadProbe:
    """Records every tensor the loader reads from the files (key -> list of shapes read), by wrapping the loader's
    open_shard: get_tensor reads a whole tensor, get_slice(key)[...] a part."""

    def __init__(self):
        self.reads: dict[str, list] = {}

    def wrap(self, open_shard):
        import contextlib

        probe = self

        class Slice:
            def __init__(self, key, inner):
                self.key, self.inner = key, inner

            def __getitem__(self, index):
                t = self.inner[index]
                probe.reads.setdefault(self.key, []).append(tuple(t.shape))
                return t

            def __getattr__(self, name):
                return getattr(self.inner, name)

        class Handle:
            def __init__(self, f):
                self.f = f

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                probe.reads.setdefault(key, []).append(tuple(t.shape))
                return t

            def get_slice(self, key):
                return Slice(key, self.f.get_slice(key))

            def __getattr__(self, name):
                return getattr(self.f, name)

        @contextlib.contextmanager
        def wrapped(path, shard):
            with open_shard(path, shard) as f:
                yield Handle(f)

        return wrapped


def expected_read(key: str, shape: tuple, dtype: str, style: str, start: int, end: int) -> tuple:
    """The part of a planned layer's weight a rank must read: its rows or columns; for INT4-packed int32 weights
    (8 values a word along K) the words holding its columns."""
    if style.startswith("colwise"):
        return (end - start, *shape[1:])
    if dtype in ("I32", "U32"):
        return (shape[0], -(-end // 8) - start // 8)
    return (shape[0], end - start)


# MoE checkpoints (test_parallel.py writes them): experts of intermediate size MOE_INTER, in every format the loader
# reads MoE experts in; W = 3 and 4 load the first three only (the test file's time), each of MOE_LOADS_EP with
# ep_size = W too.
MOE_INTER = 160
MOE_LOADS = ["qwen3-fp8-block", "deepseek-fp8-block", "qwen3-quark-int4-fp8", "qwen3-fp8-block-ue8m0",
             "qwen3-ct-fp8-dynamic", "qwen3-ct-fp8-static", "qwen3-fp8-tensor-static"]
MOE_LOADS_EP = ["qwen3-fp8-block", "deepseek-fp8-block", "qwen3-quark-int4-fp8"]
# Issue 26's done-when, W = 2 only: Qwen3-MoE, hidden 256 (attention shards on whole blocks), 4 block-scaled experts
# of 160 split into two shards of 80: at most 55% of one process's FP8 bytes a rank.
DONE_WHEN = "moe-qwen3-fp8-block-4x160"
REFUSED = ("-narrow", "-bf16-experts")  # checkpoints tp_size cannot load: 1-row experts, experts kept in bf16


def loads_at(world: int, paths: dict) -> list[tuple]:
    """[(checkpoint name, ep)] that load_job runs at world ranks."""
    out = []
    for name in paths:
        variant = name[len("moe-"):]
        if name == DONE_WHEN:
            out += [(name, False)] if world == 2 else []
        elif not name.startswith("moe-"):
            out.append((name, False))
        elif variant in MOE_LOADS:
            if world == 2 or variant in MOE_LOADS[:3]:
                out.append((name, False))
            if variant in MOE_LOADS_EP:
                out.append((name, True))
        else:  # REFUSED
            out.append((name, False))
    return out


def run_refused(world: int, name: str, path: str) -> str:
    """A MoE checkpoint tp_size = W cannot shard: refused with the reason, before any tensor is read."""
    from unittest import mock

    import fp8kern
    from fp8kern.checkpoints import loader

    want = ("fewer rows than the tensor-parallel size" if name.endswith("-narrow") else
            "the checkpoint stores these experts in high precision")
    probe = ReadProbe()
    try:
        with mock.patch.object(loader, "open_shard", probe.wrap(loader.open_shard)):
            fp8kern.from_pretrained(path, tp_size=world)
    except ValueError as e:
        assert want in str(e), str(e)
    else:
        raise AssertionError(f"{name}: from_pretrained(tp_size={world}) did not raise")
    assert not probe.reads, f"{name}: read {sorted(probe.reads)[:3]} before refusing"
    return f"{name}: refused before reading"


def run_load(world: int, name: str, path: str, ep: bool) -> str:
    """name 'moe-*': a MoE checkpoint, its experts tensor parallel, or spread whole over the ranks with ep."""
    from unittest import mock

    import fp8kern
    from fp8kern.checkpoints import common, loader
    from fp8kern.parallel import split_bounds
    from fp8kern.parallel.plan import plan_shards

    moe = name.startswith("moe-")
    ep = {"ep_size": world} if ep else {}
    probe = ReadProbe()
    with mock.patch.object(loader, "open_shard", probe.wrap(loader.open_shard)):
        tp = fp8kern.from_pretrained(path, tp_size=world, **ep)
    ref = fp8kern.parallel.shard_model(fp8kern.from_pretrained(path), tp_size=world, **ep)
    single = fp8kern.from_pretrained(path)

    # The same shard as loading everything and sharding in memory, byte for byte.
    a, b = tp.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k

    # Each planned weight read as this rank's rows or columns only, once; nothing else read twice. Tensor-parallel
    # experts: every expert's gate / up rows and down columns [r0, r1) of MOE_INTER, read as a planned layer's.
    header = common.read_header(path)
    rank = dist.get_rank()
    planned = {n: (style, s, e) for n, style, s, e in plan_shards(single, world, rank, None)}
    if moe and not ep:
        r0, r1 = split_bounds(MOE_INTER, world)[rank]
        for key in header:
            hit = re.search(r"^(.+\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$", key)
            if hit:
                planned[hit[1]] = ("rowwise" if hit[2] == "down_proj" else "colwise", r0, r1)
    per = 12 // world  # EP: 12 experts; this rank reads experts [rank * per, (rank + 1) * per)
    for key in header:
        hit = re.search(r"\.experts\.(\d+)\.", key)
        if ep and hit and not rank * per <= int(hit[1]) < (rank + 1) * per:
            assert key not in probe.reads, f"read {key}, an expert of another rank"
    for key, shapes in probe.reads.items():
        assert len(shapes) == 1, (key, shapes)
        mod = key.rsplit(".", 1)[0]
        if key.endswith((".weight", "._weight_qdata")) and mod in planned:
            want = expected_read(key, header[key].shape, header[key].dtype, *planned[mod])
            assert shapes[0] == want, (key, shapes[0], want)
        else:
            assert shapes[0] == header[key].shape, (key, shapes[0])
    sizes = {"F8_E4M3": 1, "F8_E8M0": 1, "I32": 4, "U32": 4, "F32": 4, "BF16": 2, "F16": 2}
    nbytes = sum(math.prod(s[0]) * sizes[header[k].dtype] for k, s in probe.reads.items())
    whole = sum(math.prod(i.shape) * sizes[i.dtype] for i in header.values())

    if name in ("fp8-block-3-shards", "moe-qwen3-fp8-block", DONE_WHEN):  # the bytes tools/tp_memory.py counts
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
        import json

        import tp_memory

        with open(os.path.join(path, "config.json")) as f:
            cfg = {k: v for k, v in json.load(f).items() if k != "quantization_config"}
        counted = tp_memory.per_rank_bytes(cfg, world, "block", bool(ep))["ranks"][rank]
        held = sum(t.numel() * t.element_size() for t in tp.state_dict().values())
        assert held == counted["fp8_layers"] + counted["replicated_bf16"], (held, counted)

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    experts = {n: m for n, m in tp.named_modules() if isinstance(m, fp8kern.parallel.TensorParallelExperts)}
    assert bool(experts) == (moe and not ep)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, a)) for n, m in experts.items()]
    with torch.no_grad():
        got, want, one = tp(ids).logits, ref(ids).logits, single(ids).logits
        for h in hooks:
            h.remove()
        for n, layer in experts.items():  # every experts layer within its bound, its FP8 down inputs one device's
            check_tp_experts_layer(n, single.get_submodule(n), layer, *seen[n], world)
    assert torch.equal(got, want)
    # Against one process, a sanity check (the byte-equal shard above, and the per-layer bounds of the in-memory
    # tests, are the claim): MoE logits move more, through near-ties in routing and FP8 requantization downstream.
    x, y = got.double().flatten(), one.double().flatten()
    cos = float(x @ y / (x.norm() * y.norm()))
    assert cos > (0.999 if moe else 0.9999), cos
    # The FP8 weight bytes (e4m3 tensors) this rank holds, of one process's.
    fp8_bytes = [sum(t.numel() for t in m.state_dict().values() if t.dtype == torch.float8_e4m3fn)
                 for m in (tp, single)]
    fraction = fp8_bytes[0] / fp8_bytes[1]
    if name == DONE_WHEN:
        assert fraction <= 0.55, fraction
    return (f"{name}{' ep' if ep else ''}: read {nbytes} of {whole} bytes, holds {fraction:.1%} of the FP8 bytes, "
            f"cosine to one process {cos:.7f}")


def load_job(world: int, paths: dict, loads: list) -> list[str]:
    return [run_refused(world, name, paths[name]) if name.endswith(REFUSED) else run_load(world, name, paths[name], ep)
            for name, ep in loads]


def moe_config(arch: str, experts: int = 12, inter: int = 96, hidden: int = 192):
    """Tiny Qwen3-MoE (a dense layer too; hidden / 16 heads) or DeepSeek-V3 (MLA attention, replicated; a dense
    first layer, a shared expert; hidden 192): 12 experts of intermediate size inter (96 or 160: not a multiple of
    128, so padded gate/up rows for block scales; 160 splits into tensor-parallel shards of 80, 54 / 53 / 53 and 40
    rows)."""
    import transformers

    if arch == "qwen3":
        return transformers.Qwen3MoeConfig(hidden_size=hidden, intermediate_size=320, moe_intermediate_size=inter,
                                           num_hidden_layers=2, num_attention_heads=hidden // 16,
                                           num_key_value_heads=hidden // 16,
                                           head_dim=16, vocab_size=256, num_experts=experts, num_experts_per_tok=2,
                                           max_position_embeddings=64, mlp_only_layers=[1])
    return transformers.DeepseekV3Config(hidden_size=192, intermediate_size=320, moe_intermediate_size=inter,
                                         num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=experts,
                                         num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                         q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                         v_head_dim=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                         max_position_embeddings=64)


def build_moe(arch: str, scheme: str, experts: int = 12, inter: int = 96):
    """The MoE model quantized by quantize_model (on this seed and input some experts receive no token, which
    run_moe_case asserts)."""
    import transformers

    import fp8kern

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(arch, experts, inter))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name and not name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape) * 0.05 * torch.exp2(torch.rand(*p.shape[:-1], 1) * 4 - 2))
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = {"calibration_data": [ids]} if scheme == "static_per_tensor" else {}
    fp8kern.quantize_model(model, scheme, **kw)
    return model, ids


def check_experts_layer(name, single, ep, x, idx, w, y, world):
    """|y_ep - y_1| <= ((2k + 1) 2^-8 + W 2^-24) sum_j |t_j| + 2^-133 per element.

    Both sides compute the same per-(token, expert) terms t_j = bf16(w_j y_j): the expert's GEMMs see the same rows
    on its rank as on one device, per-token / per-group / static activation scales do not depend on the other rows,
    and per-tensor ones are reduced over the ranks. One device adds the k terms into a bf16 output, rounding each sum
    (k roundings, each within 2^-8 of the running sum, itself at most sum |t_j|: bf16 has 8 significant bits); each
    rank does the same for its own terms, the fp32 all_reduce adds W partials (W roundings of 2^-24), and the cast
    to bf16 rounds once more: the two results are within the sum of both errors. t_j comes from the single-device
    experts run with only slot j routed."""
    E = single.num_experts
    terms = torch.zeros_like(x, dtype=torch.float64)
    for j in range(idx.shape[1]):
        only = torch.full_like(idx, E)
        only[:, j] = idx[:, j]
        terms += single(x, only, w).double().abs()
    ref = single(x, idx, w).double()
    k = idx.shape[1]
    bound = ((2 * k + 1) * 2.0**-8 + world * 2.0**-24) * terms + 2.0**-133
    err = (y.double() - ref).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{name}: |ep - single| = {float(err.flatten()[worst])} > bound "
                                        f"{float(bound.flatten()[worst])}")


def run_moe_case(world: int, arch: str, scheme: str) -> str:
    import fp8kern
    from fp8kern.nn import Fp8Experts
    from fp8kern.parallel import ColumnParallel, ExpertParallel, RowParallel

    model, ids = build_moe(arch, scheme)
    single = copy.deepcopy(model)
    fp8kern.parallel.shard_model(model, tp_size=world, ep_size=world)
    eps = {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallel)}
    tps = {n: m for n, m in model.named_modules() if isinstance(m, (ColumnParallel, RowParallel))}
    assert eps and tps and not any(isinstance(m, Fp8Experts) and n in eps for n, m in model.named_modules())
    got, want, seen = logits_and_io(model, single, ids, {**eps, **tps})
    with torch.no_grad():
        counts = torch.zeros(12, dtype=torch.long)
        for n, layer in eps.items():
            x, idx, w, y = seen[n]
            counts += torch.bincount(idx.reshape(-1), minlength=13)[:12]
            assert layer.local.num_experts == 12 // world
            check_experts_layer(n, single.get_submodule(n), layer, x, idx, w, y, world)
            # Routing made uneven on purpose: most slots to expert 0, some to expert 5, some to no expert (index
            # 12), so that the other experts, and at W >= 3 whole ranks, receive no token.
            crafted = torch.zeros_like(idx)
            crafted[1::3, 1] = 5
            crafted[2::4, 0] = 12
            check_experts_layer(n, single.get_submodule(n), layer, x, crafted, w, layer(x, crafted, w), world)
            expect_out_of_range_refused(layer, x, crafted, w)
        check_tp_layers(single, tps, {n: (seen[n][0], seen[n][-1]) for n in tps}, world)
    # Looser than the dense models: a one-ulp bf16 difference in a layer's output can flip an e4m3 rounding
    # downstream (2^-4 relative) or a near-tie in top-k routing, so whole-model logits of a MoE differ more than
    # each layer does.
    cos = logits_agree(got, want, world, 0.999)
    return f"{arch}/{scheme}: cosine {cos:.7f}, tokens per expert {counts.tolist()}"


def record_down_operands(experts) -> dict:
    """Make experts (an Fp8Experts) record its down projection's operands on each forward: the quantized input q,
    its scales s and the rows per expert (its rows are sorted by expert, as Fp8Experts documents)."""
    seen = {}
    gemms = experts._gemms

    def recording(q, s, weight, scale, counts, out, *cuts):
        if weight is experts.down_weight:
            seen.update(q=q.clone(), s=s.clone(), counts=list(counts))
        return gemms(q, s, weight, scale, counts, out, *cuts)

    experts._gemms = recording
    return seen


def dequantized_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 q * s for activation scales per tensor ([1]), per row ([rows] or [rows, 1]) or per 1x128 group."""
    Q, S = q.double(), s.float().double()
    if S.numel() == 1:
        return Q * S.reshape(())
    S = S.reshape(Q.shape[0], -1)
    return Q * (S if S.shape[1] == 1 else S.repeat_interleave(128, dim=1)[:, :Q.shape[1]])


def check_tp_experts_layer(name, single, tp, x, idx, w, world):
    """Tensor-parallel experts against one device on the same input and routing. First the claim that every FP8
    value is one device's: the down projection's quantized input on this rank (its columns [r0, r1), after the
    block_offset padding) and its scales are bit for bit the single-device ones. Then, with those operands (A: the
    dequantized down input, D_e: expert e's dequantized down weight, Y_j = A_j D_e^T exactly and S_j = |A_j| |D_e|^T
    for the (token, slot) row j of weight w_j, k slots a token):

        |y_tp - y_1| <= 2 gamma_M sum_j |w_j| S_j + 2u (k + 2) sum_j A_j + (k + 4) 2^-133,
        A_j = |w_j| (|Y_j| + gamma_M S_j),  u = 2^-8,  gamma_M = M 2^-24 / (1 - M 2^-24),  M = I + G + k + W + 4

    fp32 arithmetic: one device's down GEMM sums the exact FP8 products (exact in fp32) in fp32 over I columns, in
    G = ceil(I / 128) block partial sums each scaled (2 roundings) and added; a rank does the same over its columns,
    then multiplies by w_j, adds k rows per token and the all_reduce adds W partials, all in fp32: each side is
    within gamma_M sum_j |w_j| S_j of the exact sum_j w_j Y_j. bf16 (u): one device rounds y_j, then y_j w_j, then
    each of its k additions (of partial sums at most sum A_j, grown by (1 + u)^2); the tensor-parallel result is
    rounded once: (k + 3) u (1 + u)^2 + 2^-24 <= 2u (k + 2) of sum A_j, plus half the bf16 subnormal step per
    rounding. The gate/up GEMMs need no term: their inputs and weights are one device's, so h is too (checked
    through its FP8 values)."""
    from experts_oracle import deq64

    from fp8kern.parallel.sharding import block_range

    one, mine = record_down_operands(single), record_down_operands(tp.local)
    ref, got = single(x, idx, w), tp(x, idx, w)
    del single._gemms, tp.local._gemms
    if "q" not in one:  # no row routed to any expert: nothing computed on either side
        assert "q" not in mine and not bool(ref.any()) and not bool(got.any())
        return
    r0, r1 = tp.rows
    pad = tp.local.block_offset
    assert one["counts"] == mine["counts"]
    assert torch.equal(mine["q"][:, pad:].view(torch.uint8), one["q"][:, r0:r1].view(torch.uint8)), \
        f"{name}: the down projection's FP8 input differs from one device's"
    s1, s_tp = one["s"], mine["s"]
    if single.act_granularity == "group" and single.dynamic:
        s1 = s1[:, block_range(r0, r1)]
    assert torch.equal(s_tp.float(), s1.float()), f"{name}: the down projection's input scales differ"

    block = single.weight_granularity == "block"
    A = dequantized_rows(one["q"], one["s"])
    k, I, H = idx.shape[1], single.intermediate_size, single.hidden_size
    flat = idx.reshape(-1).long()
    sel = torch.argsort(flat, stable=True)[:A.shape[0]]  # the rows' (token, slot) pairs, grouped by expert
    Y, S = torch.zeros(A.shape[0], H, dtype=torch.float64), torch.zeros(A.shape[0], H, dtype=torch.float64)
    r = 0
    for e, c in enumerate(one["counts"]):
        if c:
            D = deq64(*single.projection(e, "down"), block)
            Y[r:r + c], S[r:r + c] = A[r:r + c] @ D.T, A[r:r + c].abs() @ D.abs().T
        r += c
    M = I + -(-I // 128) + k + world + 4
    gamma = M * 2.0**-24 / (1 - M * 2.0**-24)
    wj = w.reshape(-1)[sel].double().abs()[:, None]
    token = sel // k
    fp32 = torch.zeros(x.shape, dtype=torch.float64).index_add_(0, token, wj * S)
    Aj = torch.zeros(x.shape, dtype=torch.float64).index_add_(0, token, wj * (Y.abs() + gamma * S))
    bound = 2 * gamma * fp32 + 2 * 2.0**-8 * (k + 2) * Aj + (k + 4) * 2.0**-133
    err = (got.double() - ref.double()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"{name}: |tp - single| = {float(err.flatten()[worst])} > bound "
                                        f"{float(bound.flatten()[worst])}")


def run_tp_experts_case(world: int, arch: str, scheme: str, match: bool = True) -> str:
    """Experts of intermediate size 160 split into W shards (80; 54 / 53 / 53; 40 rows: below 128 and, at W = 3 and
    4, not multiples of 16), with tp_size = W and no ep_size: every experts layer against one device
    (check_tp_experts_layer) on the model's routing and on crafted routing where most experts receive no token,
    every tensor-parallel layer within its bound, an out-of-range expert index raising on every rank."""
    import fp8kern
    from fp8kern.parallel import ColumnParallel, RowParallel, TensorParallelExperts, split_bounds

    model, ids = build_moe(arch, scheme, inter=160)
    single = copy.deepcopy(model)
    fp8kern.parallel.shard_model(model, tp_size=world, match_single_device=match)
    tpe = {n: m for n, m in model.named_modules() if isinstance(m, TensorParallelExperts)}
    tps = {n: m for n, m in model.named_modules() if isinstance(m, (ColumnParallel, RowParallel))}
    assert tpe and tps
    got, want, seen = logits_and_io(model, single, ids, {**tpe, **tps})
    with torch.no_grad():
        if match:
            for n, layer in tpe.items():
                x, idx, w, _ = seen[n]
                assert layer.rows == split_bounds(160, world)[dist.get_rank()] and layer.local.num_experts == 12
                check_tp_experts_layer(n, single.get_submodule(n), layer, x, idx, w, world)
                crafted = torch.zeros_like(idx)  # most slots to expert 0, some to 5, some to no expert (12)
                crafted[1::3, 1] = 5
                crafted[2::4, 0] = 12
                check_tp_experts_layer(n, single.get_submodule(n), layer, x, crafted, w, world)
                check_tp_experts_layer(n, single.get_submodule(n), layer, x, torch.full_like(idx, 12), w, world)
                expect_out_of_range_refused(layer, x, crafted, w)
            check_tp_layers(single, tps, {n: (seen[n][0], seen[n][-1]) for n in tps}, world)
    # A sanity check (the per-layer bounds are the claim): the experts' outputs are rounded to bf16 once here and
    # several times on one device, and a one-ulp difference can flip an FP8 rounding or a routing near-tie
    # downstream.
    cos = logits_agree(got, want, world, 0.999 if match else 0.99)
    return f"{arch}/{scheme}/match={match}: cosine {cos:.7f}"


TP_EXPERTS_CASES = [("qwen3", "block128"), ("deepseek", "block128"), ("qwen3", "dynamic_per_token"),
                    ("deepseek", "dynamic_per_tensor"), ("qwen3", "block128", False)]


def tp_experts_job(world: int) -> list[str]:
    lines = [run_tp_experts_case(world, *case) for case in TP_EXPERTS_CASES]
    import fp8kern

    model, _ = build_moe("qwen3", "block128", inter=world - 1)  # fewer intermediate rows than ranks
    try:
        fp8kern.parallel.shard_model(model, tp_size=world)
    except ValueError as e:
        assert f"intermediate size {world - 1}, fewer rows than the tensor-parallel size {world}" in str(e), str(e)
        assert "pass ep_size" in str(e), str(e)
    else:
        raise AssertionError("experts narrower than the number of ranks did not raise")
    assert not any(type(m).__name__ in ("ColumnParallel", "TensorParallelExperts") for m in model.modules())
    return lines


MOE_CASES = [("qwen3", "dynamic_per_token"), ("qwen3", "dynamic_per_tensor"), ("qwen3", "block128"),
             ("deepseek", "block128"), ("deepseek", "dynamic_per_token")]


def run_moe_errors(world: int) -> None:
    import fp8kern

    if world == 4:  # 6 experts over 4 ranks
        model, _ = build_moe("qwen3", "dynamic_per_token", experts=6)
        try:
            fp8kern.parallel.shard_model(model, ep_size=4)
        except ValueError as e:
            assert "has 6 experts, not divisible by ep_size=4" in str(e), str(e)
        else:
            raise AssertionError("6 experts over 4 ranks did not raise")


def moe_job(world: int) -> list[str]:
    lines = [run_moe_case(world, *case) for case in MOE_CASES]
    run_moe_errors(world)
    return lines
