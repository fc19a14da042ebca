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


def herd_from_hf(hf, args):
    """herd's Transformer holding the weights of a transformers LlamaForCausalLM (e.g. hf_model(args))."""
    from herd.checkpoint import hf_to_meta
    from herd.model import Transformer

    model = Transformer(args)
    sd = hf_to_meta(hf.state_dict(), args)
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---- tiny random models ----------------------------------------------------------------------------------------

TINY_LLAMA3 = "tiny-llama3-vocab"  # dim 64, 2 layers, the real 128,256-id Llama 3 vocabulary


def tiny_model(name: str = "tiny", dtype=None, *, seed: int | None = None, std: float | None = None,
               random_norms: bool = False, model_cls=None, **changes):
    """A random herd Transformer of config `name` (fields in `changes` override it), in eval mode.

    seed: torch.manual_seed first (else the global RNG goes on from where it is); std: init_weights' std (else its
    pretraining default 0.02; 0.3 gives peaked logits, so greedy ids are not decided by rounding noise);
    random_norms: norm weights uniform in [0.5, 1.5] (a swapped or dropped norm then shows); dtype: cast at the end;
    model_cls: a Transformer subclass."""
    from herd.config import get_config
    from herd.model import Transformer

    args = get_config(name).replace(**changes) if changes else get_config(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = (model_cls or Transformer)(args)
    model.init_weights(**({} if std is None else {"std": std}))
    if random_norms:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def greedy_ids(model, prompts, max_tokens: int, **engine_kw) -> list[list[int]]:
    """Greedy token ids of each prompt from herd's engine (all prompts batched together, no stop tokens), with a
    byte-level tokenizer of 512 ids (the tiny configs' vocabulary)."""
    from herd.engine import Engine, GenRequest
    from herd.sampling import SamplingParams
    from herd.tokenizer import Tokenizer

    engine = Engine(model, Tokenizer({bytes([b]): b for b in range(256)}), **engine_kw)
    seqs = [engine.add(GenRequest(list(p), max_tokens, SamplingParams(temperature=0), stop_token_ids=[]))
            for p in prompts]
    rows = {s.id: [] for s in seqs}
    while engine.has_work:
        for s, ev in engine.step():
            if ev.token is not None:
                rows[s.id].append(ev.token)
    return [rows[s.id] for s in seqs]


def make_llm(seed: int = 0, model_cls=None, **shape):
    """An fp32 LLM (herd.api) with random weights in the tiny-llama3-vocab shape and the real Llama 3 tokenizer
    (fields in `shape` override the config). The same seed gives the same weights, so one instance can serve while
    another is the oracle."""
    from herd.api import LLM
    from herd.tokenizer import load_tokenizer

    model = tiny_model(TINY_LLAMA3, seed=seed, model_cls=model_cls, **shape).float()
    return LLM(model, load_tokenizer(None, n_words=model.args.vocab_size))


@pytest.fixture(scope="session")
def tok():
    """The real Llama 3 tokenizer (read-only)."""
    from herd.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A saved HF checkpoint folder of tiny_model(seed=0, std=0.3) with a byte-level tokenizer.model (256 byte tokens
    + 256 specials = the tiny vocabulary). Read-only: tests write elsewhere."""
    from herd.checkpoint import save_hf
    from herd.tokenizer import write_tiktoken_bpe

    d = tmp_path_factory.mktemp("tiny-ckpt") / "hf"
    save_hf(tiny_model(seed=0, std=0.3), None, d)
    write_tiktoken_bpe({bytes([i]): i for i in range(256)}, d / "tokenizer.model")
    return d


# ---- servers (helpers in serve_utils.py) ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def oracle():
    """make_llm(): the weights every server fixture serves, for the replies to compare against. Only generate with
    it in the test's own thread (it is never served)."""
    return make_llm()


@pytest.fixture(scope="module")
def server(request):
    """A herd server on 127.0.0.1 serving a fresh make_llm(), one per test module (a ServerThread: `.url`, `.port`,
    `.ctx`); the module's SERVER_OPTIONS dict, if any, goes to create_app (e.g. max_batch)."""
    from serve_utils import serve

    with serve(make_llm(), **getattr(request.module, "SERVER_OPTIONS", {})) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    """An httpx.Client on the module's server."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
