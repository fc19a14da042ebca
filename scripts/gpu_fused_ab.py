"""A/B on a GPU: compiled int8/int4 decode with the fused multiply + sum form vs F.linear on a float copy."""
import sys
import time

sys.path.insert(0, "src")
import torch  # noqa: E402

import herd.quantize as hq  # noqa: E402
from herd.config import get_config  # noqa: E402
from herd.generate import Engine  # noqa: E402
from herd.sampling import SamplingParams  # noqa: E402
from herd.model import Transformer  # noqa: E402

shape, kinds = sys.argv[1], sys.argv[2].split(",")
g = SamplingParams(temperature=0)
prompt = list(range(1, 129))
with torch.device("cuda"):
    base = Transformer(get_config(shape))
    base.init_weights()
base = base.to(torch.bfloat16).eval()
for kind in kinds:
    m = Transformer(base.args).to("cuda", torch.bfloat16).eval()
    m.load_state_dict(base.state_dict())
    hq.quantize_model(m, kind, 128)
    for fused in (True, False):
        hq.FUSED_DECODE_DEVICES = {"cuda"} if fused else set()
        torch._dynamo.reset()
        e = Engine(m, compile=True)
        t = time.perf_counter()
        for _ in e.generate([prompt], g, max_new_tokens=3):
            pass
        c = time.perf_counter() - t
        best = 0.0
        for _ in range(2):
            for _ in e.generate([prompt], g, max_new_tokens=64):
                pass
            best = max(best, e.last_stats["decode_tok_s"])
        print(f"{shape} {kind} compiled, {'fused multiply+sum' if fused else 'F.linear on a float copy'}: "
              f"{best:.1f} tok/s (compile {c:.0f} s)", flush=True)
        m.clear_caches()
