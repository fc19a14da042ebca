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
