"""PyTorch-native parallelism on CPU with gloo and 2 processes: TP-2 forward == unsharded forward; FSDP2 and TP
training runs under torchrun reproduce a 1-process run with the same global batch; DCP reshards on resume.
Activation checkpointing and compile (applied per block, as parallel.py does) keep the losses."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.config import get_config
from herd.model import Transformer
from herd.train import PRETRAINING, parallel, train

from .pretrain_utils import losses, tiny_settings, torchrun, write_config


def _tp_worker(rank: int, world: int, init_file: str, name: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        args = get_config(name).replace(n_layers=3)
        torch.manual_seed(0)
        ref = Transformer(args)
        ref.init_weights()
        with torch.no_grad():  # non-trivial norms, so a norm weight that is wrongly sharded would show
            for n, p in ref.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        model = Transformer(args)
        model.load_state_dict(ref.state_dict())
        parallel.apply_tp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
        assert model.layers[0].attention.wq.weight.to_local().shape[0] == args.dim // world
        tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        got, want = model(tokens), ref(tokens)
        assert got.shape == want.shape and not isinstance(got, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # and the backward: the global gradient norm over sharded parameters equals the unsharded one
        got.logsumexp(-1).mean().backward()
        want.logsumexp(-1).mean().backward()
        g_tp = parallel.clip_grad_norm_(list(model.parameters()), None)
        g_ref = parallel.clip_grad_norm_(list(ref.parameters()), None)
        torch.testing.assert_close(g_tp, g_ref, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_tp2_forward_equals_unsharded_forward(tmp_path, name):
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), name), nprocs=2, join=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 6 steps in this process, global batch 8 as 2 micro-batches of 4."""
    tmp = tmp_path_factory.mktemp("parallel")
    s = tiny_settings(tmp, "optim.decay_steps=6", run="single")
    return tmp, train(s, PRETRAINING)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_two_rank_run_matches_one_process(one_process, layout):
    tmp, ref = one_process
    extra = ["parallel.tp=2"] if layout == "tp" else []  # fsdp: 2 ranks x 1 micro-batch of 4
    cfg = write_config(tmp, f"{layout}.yaml", run=layout)
    out = torchrun(2, "pretrain", "--config", str(cfg), "optim.decay_steps=6", "train.steps=4", *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"(dp {1 if layout == 'tp' else 2} x tp {2 if layout == 'tp' else 1})" in out.stderr
    got = losses(tmp / layout)
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in got.items():
        assert loss == pytest.approx(ref.losses[step], rel=1e-5, abs=1e-6), step

    # DCP reshards: the 2-rank checkpoint of step 4 resumes in one process and continues the reference run
    resumed = train(tiny_settings(tmp, "optim.decay_steps=6", run=layout), PRETRAINING)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert resumed.losses[step] == pytest.approx(ref.losses[step], rel=1e-5, abs=1e-6), step
    assert resumed.val_loss == pytest.approx(ref.val_loss, rel=1e-5)


def _eval_setup(tmp, sequences: int, micro_batch: int):
    """A tiny model, 9 held-out sequences (some labels ignored) and settings asking for `sequences` of them."""
    import numpy as np

    from herd.train.pretrain import causal_lm_loss

    s = tiny_settings(tmp, f"eval.sequences={sequences}", f"train.micro_batch={micro_batch}")
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    model.init_weights()
    r = np.random.default_rng(0)
    val = []
    for i in range(9):
        ids = r.integers(0, 512, 33)
        labels = ids[1:].copy()
        labels[: 3 * i] = -100  # rows with different numbers of counted tokens
        val.append((ids[:-1], labels))
    return s, model, val, causal_lm_loss


def _eval_worker(rank: int, world: int, tmp: str, sequences: int, micro_batch: int):
    from contextlib import nullcontext
    from pathlib import Path

    from torch.distributed.device_mesh import init_device_mesh

    from herd.train.loop import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        s, model, val, loss_fn = _eval_setup(Path(tmp), sequences, micro_batch)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        parallel.apply_fsdp(model, mesh)  # FSDP: every rank must run the same number of forwards, or it hangs
        got = evaluate(model, val, s, torch.device("cpu"), rank, world, mesh.get_group(), nullcontext(), loss_fn)
        (Path(tmp) / f"loss{rank}").write_text(repr(got))
        dist.barrier()  # no rank tears gloo down while the other still has collectives (or FSDP's hooks) in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sequences, micro_batch", [(7, 1), (5, 2), (1, 1)])
def test_held_out_loss_on_two_ranks_equals_one_process(tmp_path, sequences, micro_batch):
    """The held-out set is the first eval.sequences sequences whatever the number of ranks: an odd count is not
    cut to an even one (a rank short of a sequence runs a masked dummy that adds zero loss and zero tokens)."""
    from contextlib import nullcontext

    from herd.train.loop import evaluate

    s, model, val, loss_fn = _eval_setup(tmp_path, sequences, micro_batch)
    want = evaluate(model, val, s, torch.device("cpu"), 0, 1, None, nullcontext(), loss_fn)
    mp.spawn(_eval_worker, args=(2, str(tmp_path), sequences, micro_batch), nprocs=2, join=True)
    got = [float((tmp_path / f"loss{r}").read_text()) for r in range(2)]
    assert got[0] == got[1]
    if micro_batch == 1:  # the same per-sequence float32 sums, added exactly in float64: bit-equal
        assert got[0] == want
    else:  # micro-batches group other sequences on 2 ranks: float32 summation order differs
        assert got[0] == pytest.approx(want, rel=1e-6)
    # and it is not the mean over an even number of them (what `n -= n % dp` used to give)
    if sequences > 1:
        fewer = evaluate(model, val, tiny_settings(tmp_path, f"eval.sequences={sequences - 1}",
                                                   f"train.micro_batch={micro_batch}"),
                         torch.device("cpu"), 0, 1, None, nullcontext(), loss_fn)
        assert abs(fewer - want) > 1e-4


def test_build_mesh_rejects_bad_layouts():
    env = parallel.DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs 2 processes"):
        parallel.build_mesh(env, 2)
    assert parallel.build_mesh(env, 1) is None
    assert os.environ.get("WORLD_SIZE", "1") == "1" and parallel.init_distributed("cpu").world == 1


@pytest.mark.slow  # torch.compile's first (cold-cache) compilation takes ~25 s on 2 cores
def test_activation_checkpointing_and_compile_keep_the_losses(tmp_path):
    def losses_of(*overrides, run):
        return train(tiny_settings(tmp_path, "train.steps=3", *overrides, run=run), PRETRAINING).losses

    base = losses_of(run="eager")
    ac = losses_of("train.activation_checkpointing=true", run="ac")
    assert ac == base  # recomputation repeats the same float32 operations
    compiled = losses_of("train.compile=true", run="compiled")
    for step, loss in compiled.items():
        assert loss == pytest.approx(base[step], rel=1e-4), step
