import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# No downloads at test time: the hub libraries must never try the network.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


# Tests that take the `device` fixture run on every device torch sees: the CPU here and in CI, and also CUDA on a
# GPU machine (scripts/gpu_check.sh runs them there), so the GPU path is checked by the same oracles.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Each test starts from a fixed seed and float32 default dtype."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def hf_model(args, seed: int = 0):
    """transformers' LlamaForCausalLM for a herd config, with random weights (the oracle)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**args.to_hf("float32"))
    model = LlamaForCausalLM(cfg).eval()
    # transformers initialises norms to ones; randomise them so the parity test sees the weight multiply
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model
