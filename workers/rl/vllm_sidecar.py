"""The vLLM side of `workers/rl/vllm_engine.py`: one process in the vLLM environment (`make vllm`).

vLLM pins its own transformers and fastapi, so it cannot share rft's environment: the training worker
starts this script with the vLLM environment's python and talks to it over a pipe. It imports only
the standard library, torch and vllm, never rft. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight update is a call, not a second hop.

    <vllm python> vllm_sidecar.py '{"model": "/dev/shm/rft-vllm-.../", "dtype": "float32", ...}'

Protocol: one JSON object per line. The answers go to the stdout this process started with; vLLM's own
printing is moved to stderr first. After start-up it writes `{"ready": true, "seconds": ...}`, then
answers each request with one line: `{"ok": ...}` or `{"error": "..."}`.

- `{"op": "sample", "prompts": [[ids]], "n", "max_tokens", "temperature", "top_p", "seeds": [one a prompt],
  "stop_token_ids": [ids], "grammar": lark or null}` -> per prompt, `n` completions of
  `{"token_ids", "logprobs", "finish_reason"}`, each held to the Lark grammar (llguidance's dialect) if any;
  `logprobs` are the sampler's own log-probabilities of the chosen tokens at temperature 1, before
  temperature, top-p and grammar masks (`logprobs_mode="raw_logprobs"`): what the trainer computes,
  so that importance-sampling correction divides out the two engines' difference and nothing else.
- `{"op": "reload", "path": folder}`: the weights again from the safetensors in `folder`, in place,
  and the prefix cache dropped (its keys and values belong to the old weights).
- `{"op": "reload", "shared": file, "layout": [{"name", "dtype", "shape", "offset"}]}`: the same from
  the worker's shared-memory file (`vllm_engine.SharedWeights`), read in place through this
  process's own mapping of it (made at the first such request, kept).
- `{"op": "adapter", "path": folder, "id": n}` (started with `max_lora_rank`): sample with the PEFT
  adapter in `folder` from now on, the previous adapter dropped, and the prefix cache too.
- `{"op": "close"}`: exit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any


def answer(out: Any, body: dict[str, Any]) -> None:
    out.write(json.dumps(body) + "\n")
    out.flush()


def sample(llm: Any, request: dict[str, Any], adapter: Any = None) -> list[list[dict[str, Any]]]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    grammar = request.get("grammar")

    greedy, n = float(request["temperature"]) == 0.0, int(request["n"])

    def params(seed: int) -> Any:  # each prompt its own seed: a part of a batch samples what the whole would
        return SamplingParams(
            n=1 if greedy else n,  # vLLM refuses n > 1 when greedy: the prompt goes n times instead
            max_tokens=int(request["max_tokens"]),
            temperature=float(request["temperature"]),
            top_p=1.0 if greedy else float(request["top_p"]),
            seed=seed,
            stop_token_ids=[int(i) for i in request["stop_token_ids"]],
            logprobs=0,  # the chosen token's own logprob only
            skip_special_tokens=False,
            detokenize=False,
            structured_outputs=None if grammar is None else StructuredOutputsParams(grammar=grammar),
        )

    copies = n if greedy else 1
    pairs = [(ids, int(seed)) for ids, seed in zip(request["prompts"], request["seeds"], strict=True)]
    prompts = [{"prompt_token_ids": [int(i) for i in ids]} for ids, _ in pairs for _ in range(copies)]
    per_prompt = [params(seed) for _, seed in pairs for _ in range(copies)]
    results = llm.generate(prompts, per_prompt, use_tqdm=False, lora_request=adapter)
    groups = []
    for first in range(0, len(results), copies):
        completions = []
        outputs = [
            c for result in results[first : first + copies] for c in sorted(result.outputs, key=lambda c: c.index)
        ]
        for c in outputs:
            logprobs = [float(step[token].logprob) for step, token in zip(c.logprobs or [], c.token_ids, strict=True)]
            completions.append(
                {"token_ids": list(c.token_ids), "logprobs": logprobs, "finish_reason": c.finish_reason or "length"}
            )
        groups.append(completions)
    return groups


def view_of(data: Any, entry: dict[str, Any]) -> Any:
    """The tensor a `SharedWeights.layout` entry (name, dtype, shape, byte offset) describes, as a
    view of the mapped bytes `data`: the layout's one reader, for the worker and for this process."""
    import torch

    dtype = getattr(torch, entry["dtype"])
    shape = [int(n) for n in entry["shape"]]
    start = int(entry["offset"])
    return data[start : start + int(torch.Size(shape).numel()) * dtype.itemsize].view(dtype).view(shape)


class Mapped:
    """The worker's `SharedWeights` file as tensors: views of this process's mapping of it, by name."""

    def __init__(self, path: str, layout: list[dict[str, Any]]) -> None:
        import torch

        self.path = path
        data = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
        self.tensors = [(entry["name"], view_of(data, entry)) for entry in layout]


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM prints; keep the protocol's stream to ourselves
    config = json.loads(sys.argv[1])
    started = time.perf_counter()
    from vllm import LLM
    from vllm.platforms import current_platform

    rank = config.get("max_lora_rank")
    lora = {"enable_lora": True, "max_lora_rank": int(rank), "max_loras": 1} if rank else {}
    whole_prefills = {}
    if current_platform.is_cpu():
        # A prompt whose prefill is split over steps has the token drawn after its first part thrown
        # away, and vLLM winds that request's seeded generator back (`set_offset`), which a CPU
        # generator refuses: "CPU Generator does not use offset" as soon as a batch's prompts exceed
        # one step's token budget (16 prompts x 8 samples of SmolLM2 did). So on a CPU every prompt
        # is prefilled whole, within a budget that holds the longest one, as vLLM itself runs MLA
        # models on CPUs.
        budget = max(int(config["max_model_len"]), 8192)
        whole_prefills = {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}
    llm = LLM(
        **lora,
        **whole_prefills,
        model=config["model"],
        dtype=config.get("dtype", "auto"),
        max_model_len=int(config["max_model_len"]),
        seed=int(config.get("seed", 0)),
        kv_cache_memory_bytes=int(config["kv_cache_bytes"]),  # a size, not a share of what is free
        enable_prefix_caching=True,
        logprobs_mode="raw_logprobs",  # the model's own distribution, as the trainer scores it
        max_logprobs=1,
        structured_outputs_config={"backend": "guidance"},  # llguidance, as our own decode loop uses
    )
    answer(out, {"ready": True, "seconds": time.perf_counter() - started})
    adapter: Any = None
    mapped: Mapped | None = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "sample":
                answer(out, {"ok": sample(llm, request, adapter)})
            elif request["op"] == "reload":
                began = time.perf_counter()
                if "shared" in request:
                    if mapped is None or mapped.path != request["shared"]:
                        mapped = Mapped(request["shared"], request["layout"])
                    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(mapped.tensors)})
                else:
                    llm.collective_rpc("reload_weights", kwargs={"weights_path": request["path"]})
                llm.reset_prefix_cache()
                answer(out, {"ok": time.perf_counter() - began})
            elif request["op"] == "adapter":
                from vllm.lora.request import LoRARequest

                began, previous = time.perf_counter(), adapter
                adapter = LoRARequest(f"rft-{request['id']}", int(request["id"]), request["path"])
                llm.llm_engine.add_lora(adapter)  # loaded now, so the next sample does not pay for it
                if previous is not None:
                    llm.llm_engine.remove_lora(previous.lora_int_id)
                llm.reset_prefix_cache()
                answer(out, {"ok": time.perf_counter() - began})
            elif request["op"] == "close":
                answer(out, {"ok": True})
                return
            else:
                answer(out, {"error": f"unknown op {request['op']!r}"})
        except Exception as error:
            answer(out, {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-4000:]})


if __name__ == "__main__":
    main()
