"""A module object standing in for `vllm` (vLLM itself needs a GPU host): `LLM(**kwargs)` records what the
engine is built with, and its `llm_engine` speaks vLLM's step API (add_request / step / has_unfinished_requests /
abort_request) and finishes requests ONE PER STEP, shortest first, out of submission order — as a continuous-batching
engine does. `RQBENCH_STANDIN_STEP_S` makes every step sleep (a subprocess can be killed mid-run).

Run as a script, it is `rqbench` with this stand-in installed as `vllm`:
    python tests/vllm_standin.py <overrides>
"""
import enum
import os
import sys
import time
import types
from types import SimpleNamespace


class StandInVLLM:
    def __init__(self, eos_text="<|im_end|>", step_s=None):
        self.engines = []
        self.step_s = float(os.environ.get("RQBENCH_STANDIN_STEP_S", "0")) if step_s is None else step_s
        self.module = types.ModuleType("vllm")
        outer = self

        class RequestOutputKind(enum.Enum):
            CUMULATIVE = 0
            DELTA = 1
            FINAL_ONLY = 2

        class SamplingParams:
            def __init__(self, *, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=None,
                         stop_token_ids=None, skip_special_tokens=True):
                self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
                self.max_tokens, self.seed, self.stop_token_ids = max_tokens, seed, stop_token_ids
                self.skip_special_tokens = skip_special_tokens
                self.output_kind = RequestOutputKind.CUMULATIVE

        def reply(sp):
            """A reply that depends on the request's own seed; every third one runs out of tokens."""
            k = sp.seed % 1000
            if k % 3 == 0:
                return SimpleNamespace(text=f"<think> {k}", token_ids=list(range(sp.max_tokens)), finish_reason="length")
            # vLLM may or may not leave the stop token's text in: the backend strips it
            return SimpleNamespace(text=f"<think> {k} </think> \\boxed{{{k}}}" + (eos_text if k % 2 else ""),
                                   token_ids=list(range(min(sp.max_tokens, 5 + k % 7))), finish_reason="stop")

        class Engine:
            def __init__(self):
                self.requests = []          # (request id, prompt, params) in the order they were added
                self.running = {}
                self.finished_order = []
                self.aborted = []

            def add_request(self, request_id, prompt, params):
                assert isinstance(request_id, str) and request_id not in self.running
                assert params.n == 1
                self.requests.append((request_id, prompt, params))
                self.running[request_id] = (prompt, params, reply(params))
                return request_id

            def has_unfinished_requests(self):
                return bool(self.running)

            def step(self):
                if outer.step_s:
                    time.sleep(outer.step_s)
                if not self.running:
                    return []
                rid = min(self.running, key=lambda r: (len(self.running[r][2].token_ids), r))
                prompt, params, o = self.running.pop(rid)
                self.finished_order.append(rid)
                outs = [SimpleNamespace(request_id=rid, finished=True, prompt_token_ids=prompt["prompt_token_ids"],
                                        outputs=[o])]
                if params.output_kind != RequestOutputKind.FINAL_ONLY:      # cumulative: every running request
                    outs += [SimpleNamespace(request_id=r, finished=False, prompt_token_ids=p["prompt_token_ids"],
                                             outputs=[SimpleNamespace(text="", token_ids=[], finish_reason=None)])
                             for r, (p, _, _) in self.running.items()]
                return outs

            def abort_request(self, request_ids):
                for r in request_ids:
                    if self.running.pop(r, None) is not None:
                        self.aborted.append(r)

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.llm_engine = Engine()
                outer.engines.append(self)

        sampling_params = types.ModuleType("vllm.sampling_params")
        sampling_params.RequestOutputKind, sampling_params.SamplingParams = RequestOutputKind, SamplingParams
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.module.sampling_params = sampling_params
        self.module.__version__ = "stand-in"

    def install(self, modules=None):
        modules = sys.modules if modules is None else modules
        modules["vllm"], modules["vllm.sampling_params"] = self.module, self.module.sampling_params


if __name__ == "__main__":
    StandInVLLM().install()
    from harness.cli import main
    main()
