"""Makes `lm_eval --model herd ...` work: registers herd's model type the moment lm-eval's registry is imported.

scripts/setup.sh puts `import herd_lm_eval_hook` in a .pth file of the virtualenv. It costs one meta-path finder
(stdlib only) at interpreter start and imports nothing from herd or lm-eval until lm-eval itself is imported.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.api.registry"


class _RegisterHerd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            # lm-eval imports its own model list only while its registry is empty: register those first.
            import lm_eval.models  # noqa: F401

            if "herd" not in module.model_registry:
                module.model_registry.register("herd", target="herd.evaluate:HerdLM")

        spec.loader.exec_module = exec_module
        return spec


if _TARGET not in sys.modules and not any(isinstance(f, _RegisterHerd) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterHerd())
