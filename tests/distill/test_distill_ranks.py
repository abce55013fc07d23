"""Data-parallel distillation (`distill.devices`): real ranks, started by the stage's launcher under real
torchrun, joined by gloo over this machine's CPUs, training a real timm model (random-init `resnet10t`
at 32 px) on real demo images.

What holds (6 steps, lr 1e-3, weights of order 1), on any x86 CPU, kernel and thread count (the error
analysis is in `test_two_gloo_ranks_follow_the_one_process_trajectory`; docs/reproducibility.md):
- two ranks follow the one-process trajectory (same global batch of 8 triplets) bit for bit when the one
  process runs on the ranks' thread count and the same two micro-batches (max |Δw| = 0, losses equal);
- against one process taking the whole batch at once the weights differ by reduction order only: within
  Adam's bound for gradients decided by rounding (`tests.numerics.adam_divergence_bound`, 7.0e-3) on every
  weight, and by under a tenth of the training displacement in L2 (measured 1e-5 to 5e-4 over ATen's AVX2
  and default kernels on 1 and 2 threads; a run on other triplets is at 1.3);
- a rank (1, or 0 in the slow variant) killed by SIGKILL mid-run: the run resumes on every rank at the same
  checkpoint and ends on the uninterrupted run's weights bit for bit (max |Δw| = 0; checked against `TOL`);
- only rank 0 writes under the run's directory (an audit hook in every rank records its writes);
- a bad `distill.devices` is refused before anything is read or written.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignet_core.config import PipelineConfig, parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.distill.batches import TripletBatches
from alignet_core.distill.checkpoints import list_checkpoints
from alignet_core.distill.launch import _rank_env, rank_device, train_on_ranks
from alignet_core.distill.objective import warmup_cosine
from alignet_core.distill.parallel import RankMicroBatches, rank_layout
from alignet_core.distill.stage import run_distill
from alignet_core.distill.train import train_student
from alignet_core.errors import ConfigError
from alignet_core.io import formats, sources
from alignet_core.io.dataset_splits import read_split
from alignet_core.models import factory as models
from alignet_core.models.student import HEAD_FILE, STUDENT_FILE, build_student, eval_transform
from alignet_core.pipeline.preflight import preflight
from tests.distill.test_distill import pixel_teacher, teacher_triplets
from tests.numerics import U32, adam_divergence_bound, torch_threads

TOL = 1e-6  # max |Δ| allowed between runs doing the same arithmetic (2 ranks resumed vs 2 ranks; measured 0)
REL_L2_WHOLE = 0.1  # ‖Δw‖₂ / ‖w − w₀‖₂ allowed against one process taking the whole batch (derivation below)
N_POOL = 60
STEPS = 6
RUN = dict(student="resnet10t", weights=None, head_dim=32, steps=STEPS, batch_triplets=8, lr=1e-3, warmup_steps=2,
           checkpoint_every=2, image_size=32)

# Installed in every rank through PYTHONPATH: records each write (open for writing, mkdir, rename, remove)
# under AUDIT_UNDER, and dumps them to AUDIT_OUT/rank<R>.json when the rank exits.
_AUDIT = textwrap.dedent(
    """
    import atexit, json, os, sys

    _under, _out, _rank = os.environ.get("AUDIT_UNDER"), os.environ.get("AUDIT_OUT"), os.environ.get("RANK")
    if _under and _out and _rank is not None:
        _events = []
        _changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
        _flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _flags)
                paths = [path] if writes else []
            elif event in _changes:
                paths = list(args[:2]) if event == "os.rename" else [args[0]]
            else:
                return
            for p in paths:
                if isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(_under):
                    _events.append([event, os.fsdecode(p)])

        sys.addaudithook(_hook)

        def _dump():
            with open(os.path.join(_out, f"rank{_rank}.json"), "w") as f:
                json.dump(_events, f)

        atexit.register(_dump)
    """
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A demo pool of N_POOL images (`source.limit`) and 400 teacher triplets over it in the official format."""
    src = sources.subset(sources.demo_source(), N_POOL)
    t = teacher_triplets(pixel_teacher(src), 400, seed=1)
    folder = tmp_path_factory.mktemp("ranks")
    url = str(folder / "train_mine.npz")
    formats.write_alignet_npz(url, t.indices, src.ids()[t.indices], t.similarities)
    return folder, url


def _cfg(root: Path, **distill) -> PipelineConfig:
    return parse_config({"root": str(root), "source": {"limit": N_POOL}, "distill": {**RUN, **distill}})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {**{f"backbone.{k}": v for k, v in load_file(str(run_dir / STUDENT_FILE)).items()},
            **{f"head.{k}": v for k, v in load_file(str(run_dir / HEAD_FILE)).items()}}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_ranks(data: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 2-rank run (gloo, 2 CPU processes) with every rank's writes audited."""
    folder, url = data
    base = tmp_path_factory.mktemp("two")
    out, audit = base / "run", base / "audit"
    audit.mkdir()
    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(_AUDIT)
    steps: list[tuple[int, float]] = []
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(base / "site"), os.environ.get("PYTHONPATH")])),
           "AUDIT_UNDER": str(out), "AUDIT_OUT": str(audit)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t0 = time.perf_counter()
        result = train_on_ranks(_cfg(base, devices=["cpu", "cpu"]), url, str(out), lambda s, l: steps.append((s, l)))
        wall = time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"out": out, "log": result, "steps": steps, "audit": audit, "wall": wall}


# ----------------------------------------------------------------------------- refused before any work
def test_bad_distill_devices_are_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for devices, message in [
        (["cpu", "gpu"], r"distill\.devices.*\['gpu'\] are not devices; expected 'cpu', 'cuda' or 'cuda:<index>'"),
        (["cpu", "cuda:0"], r"distill\.devices.*mixes cpu and cuda; use one kind.*NCCL for GPUs, gloo for CPUs"),
        (["cuda:1", "cuda:1"], r"distill\.devices.*\['cuda:1'\] named more than once; NCCL runs one rank per GPU"),
        ([], r"distill\.devices.*an empty list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"distill": {"devices": devices}})
    root = tmp_path / "root"
    uneven = with_overrides(parse_config({}), {"root": str(root), "distill.devices": ["cpu"] * 3})  # 3 ∤ 32
    want = r"distill\.devices: 3 ranks × distill\.grad_accum 1 = 3 micro-batches must divide distill\.batch_triplets \(32\)"
    with pytest.raises(ConfigError, match=want):
        preflight(uneven)
    with pytest.raises(ConfigError, match=want):
        run_distill(RunContext.of(uneven), None)
    nodes = with_overrides(uneven, {"distill.devices": ["cpu", "cpu"], "distill.nodes": 3, "distill.grad_accum": 2})
    with pytest.raises(ConfigError, match=r"6 ranks \(3 nodes × 2 devices\) × distill\.grad_accum 2 = 12 micro"):
        run_distill(RunContext.of(nodes), None)
    if not torch.cuda.is_available():
        gpus = with_overrides(parse_config({}), {"root": str(root), "distill.devices": ["cuda:0", "cuda:1"]})
        with pytest.raises(ConfigError, match=r"distill\.devices: \['cuda:0', 'cuda:1'\] asks for CUDA but torch sees no"):
            preflight(gpus)
        with pytest.raises(ConfigError, match=r"distill\.devices.*no CUDA GPU"):
            run_distill(RunContext.of(gpus), None)
    else:  # more GPUs than exist
        many = [f"cuda:{i}" for i in range(torch.cuda.device_count() + 1)]
        with pytest.raises(ConfigError, match=r"distill\.devices.*torch sees"):
            preflight(with_overrides(parse_config({}), {"distill.devices": many}))
    # several nodes: the stage does not start them; it says how, before any work
    two_nodes = with_overrides(parse_config({}), {"root": str(root), "distill.devices": ["cpu"], "distill.nodes": 2,
                                                  "distill.dataset": str(tmp_path)})
    (tmp_path / "train_cluster_border_12.npz").write_bytes(b"")  # exists; never read
    with pytest.raises(ConfigError, match=r"distill\.nodes: 2 machines.*torchrun --nnodes 2 --nproc-per-node 1 "
                                          r"--rdzv-backend c10d"):
        run_distill(RunContext.of(two_nodes), None)
    assert not root.exists()  # nothing was created under the root
    # a rank started by a torchrun whose world is not the config's refuses before joining it
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"torchrun started 3 ranks, 3 per node.*--nnodes 1 --nproc-per-node 2"):
        rank_device(rank_layout(with_overrides(parse_config({}), {"distill.devices": ["cpu", "cpu"]})))


def test_each_rank_takes_a_disjoint_share_of_every_step(data: tuple[Path, str]) -> None:
    """Rank r of N computes micro-batches r·G … r·G+G−1 of the step's N·G: together, in rank order, exactly
    the step's triplets, whatever N and G."""
    _, url = data
    src = sources.subset(sources.demo_source(), N_POOL)
    split = read_split(url, src, "indices")
    tf = eval_transform(models.create_model("resnet10t", None), 16)
    whole = TripletBatches(split, src, tf, 8, seed=3)
    for ranks, accum in [(1, 1), (2, 1), (2, 2), (4, 2)]:
        batches = TripletBatches(split, src, tf, 8, seed=3, grad_accum=ranks * accum)
        shares = [RankMicroBatches(5, 7, accum, r, ranks) for r in range(ranks)]
        for s, step in enumerate((5, 6)):
            ids = [batches[share[s * accum + i]][3].numpy() for share in shares for i in range(accum)]
            np.testing.assert_array_equal(np.concatenate(ids), whole.step_triplets(step))
            assert all(len(x) == 8 // (ranks * accum) for x in ids)
    assert len(RankMicroBatches(5, 7, 2, 1, 4)) == 4 and list(RankMicroBatches(0, 2, 1, 1, 2)) == [1, 3]


# ----------------------------------------------------------------------------- the trajectory
def ranks_threads(cfg: PipelineConfig) -> int:
    """The CPU threads each rank runs on: the OMP_NUM_THREADS the launcher gives them (`hardware.rank_threads`:
    ⌊cores / ranks⌋, unless OMP_NUM_THREADS is set here, which the ranks then inherit)."""
    return int(_rank_env(rank_layout(cfg))["OMP_NUM_THREADS"])


def _flat(w: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w[k].double().ravel() for k in sorted(w)])


@pytest.mark.numerics
def test_two_gloo_ranks_follow_the_one_process_trajectory(two_ranks: dict, data: tuple[Path, str],
                                                          tmp_path: Path) -> None:
    """Error analysis (u = 2⁻²⁴, float32's unit roundoff).

    1. Two ranks against one process on the same two micro-batches, on the ranks' thread count: the same
       operations on the same operands in the same order. Each rank's forward and backward is the one
       process's micro-batch j, with the same kernels (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS are inherited)
       on the same number of threads, pinned here with `torch_threads`: a float32 reduction split over
       another thread count adds its partial sums in another order (what failed before the pin: 3.7e-5 on
       an AVX-512 machine, 1.3e-6 on this AVX2 one under ATEN_CPU_CAPABILITY=default, against a tolerance
       of 1e-6: torchrun's ranks on 1 thread each, this process on 2). DDP's all-reduce of two ranks
       is one addition g₀ + g₁ (commutative, so the same on both ranks) and a halving; one process
       accumulates ½g₀ + ½g₁. Halving is exact in binary floating point and commutes with rounding, so
       the gradients, hence the weights and the losses, are equal bit for bit: tolerance 0.
    2. Against one process on the whole batch (grad_accum 1), the gradient sums run over 8 triplets at once
       instead of 4 + 4: another order, so each gradient coordinate differs by rounding, of order
       n·u·Σ|terms| at worst. Adam divides by the gradient's own scale, so where a coordinate's gradient
       is within that rounding of zero (but above ε = 1e-8) the step's sign is decided by the rounding:
       the two runs can differ there by up to 2·lr_t·R_t per step (R_t ≤ 1.016 for t ≤ 6, Cauchy–Schwarz
       on Adam's moments), B = Σ_t 2·lr_t·R_t = 7.0e-3 in all (`adam_divergence_bound`). No smaller bound
       on max |Δw| follows from the arithmetic, and B is as large as training moves any weight (Σ lr_t =
       3.5e-3), so max |Δw| ≤ B only guards against a blow-up. What has teeth is the L2 distance: the
       coordinates whose gradient rounding decides are few (their gradients are ~0), the others move by
       lr·(relative gradient rounding) ≪ lr. `REL_L2_WHOLE` = 0.1 of the training displacement
       ‖w − w₀‖₂ (0.51) leaves room for (0.1·0.51 / B)² ≈ 50 coordinates at Adam's worst case B; measured
       1e-5 to 5e-4 (ATen AVX2 and default kernels, 1 and 2 threads), while a run on other triplets (a
       wrong global batch) sits at 1.3. The loss is insensitive to exactly those coordinates (∂L/∂w ≈ 0):
       its curve agrees to rtol 1e-5 (measured ≤ 9e-8, ~1.4u, in every variant).
    """
    _, url = data
    src = sources.subset(sources.demo_source(), N_POOL)
    split = read_split(url, src, "indices")
    cpu = torch.device("cpu")
    log_ = two_ranks["log"]
    assert log_["complete"] and log_["ranks"] == 2 and len(log_["loss_curve"]) == STEPS
    assert [s for s, _ in two_ranks["steps"]] == list(range(1, STEPS + 1))  # progress for every step, here
    np.testing.assert_allclose([loss for _, loss in two_ranks["steps"]], log_["loss_curve"], rtol=0, atol=0)
    two = _weights(two_ranks["out"])
    threads = ranks_threads(_cfg(tmp_path, devices=["cpu", "cpu"]))
    one, curves = {}, {}
    with torch_threads(threads):  # the ranks' thread count: the same reductions in the same order
        for accum in (2, 1):  # the ranks' micro-batches in one process, and the whole batch at once
            run = train_student(split, src, _cfg(tmp_path, grad_accum=accum).distill, str(tmp_path / f"one{accum}"),
                                cpu, seed=0)
            one[accum], curves[accum] = _weights(tmp_path / f"one{accum}"), run["loss_curve"]
    start = build_student(_cfg(tmp_path).distill, seed=0)  # the weights training starts from
    w0 = _flat({**{f"backbone.{k}": v for k, v in start.backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in start.head.state_dict().items()}})
    same_micro = max_abs_diff(two, one[2])
    w, w_whole = _flat(two), _flat(one[1])
    whole = float((w - w_whole).abs().max())
    rel_l2 = float((w - w_whole).norm() / (w_whole - w0).norm())
    lrs = [RUN["lr"] * warmup_cosine(RUN["warmup_steps"], STEPS)(s) for s in range(STEPS)]
    bound = adam_divergence_bound(lrs) + 2 * STEPS * U32 * float(w_whole.abs().max())  # + the weights' own rounding
    print(f"{STEPS} steps, {threads} thread(s) per rank and here, {torch.backends.cpu.get_cpu_capability()}: "
          f"max |dw| 2 ranks vs 1 process, same micro-batches {same_micro:.3g}; vs the whole batch at once "
          f"{whole:.3g} (Adam's bound {bound:.3g}), L2 {rel_l2:.3g} of the training displacement")
    # 1. the same arithmetic: bit for bit
    assert same_micro == 0.0
    assert log_["loss_curve"] == curves[2]
    # 2. another reduction order: Adam's bound on every weight, a tenth of the displacement in L2
    assert whole <= bound
    assert rel_l2 < REL_L2_WHOLE
    np.testing.assert_allclose(log_["loss_curve"], curves[1], rtol=1e-5)
    # training moved the weights far more than any of this: the comparisons have teeth
    assert float((w - w0).abs().max()) > 1000 * TOL


def test_only_rank_0_writes_the_checkpoints(two_ranks: dict) -> None:
    out, audit = two_ranks["out"], two_ranks["audit"]
    writes = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert writes[1] == []  # rank 1 read the checkpoints' directory at most; it never wrote under it
    renamed = [dst for event, dst in writes[0] if event == "os.rename" and "/checkpoints/step_" in dst]
    assert renamed == [str(out / "checkpoints" / f"step_{s:08d}") for s in (2, 4, 6)]  # one writer, atomically
    assert any(event == "os.mkdir" and p == str(out) for event, p in writes[0])
    assert [s for s, _ in list_checkpoints(str(out / "checkpoints"))] == [STEPS]
    state = torch.load(out / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)
    assert state["ranks"] == 2 and state["step"] == STEPS
