"""One benchmark case, run in its own process so that its peak memory is its own.

``python -m bench.cases '<json spec>'`` prints one JSON line: times (seconds per iteration) and the
peak extra memory over the inputs and their gradients (CPU: peak RSS; CUDA: allocator peak).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

MARGINS = {
    "arcface": lambda: __import__("marginops").ArcFace(),
    "cosface": lambda: __import__("marginops").CosFace(),
    "normface": lambda: __import__("marginops").NormFace(),
    "combined": lambda: __import__("marginops").CombinedMargin(),
    "sphereface": lambda: __import__("marginops").SphereFace(lambda_=5.0),
    "curricularface": lambda: __import__("marginops").CurricularFace(t=0.1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(spec: dict, emb, weight, labels):
    """A closure running one iteration of the case."""
    import marginops

    provider, mode = spec["provider"], spec["mode"]
    if provider == "matmul":  # the three GEMMs of forward + backward, the floor any fused kernel is held to
        grad_logits = torch.empty(emb.shape[0], weight.shape[0], device=emb.device, dtype=emb.dtype)

        def step():
            with torch.no_grad():
                torch.matmul(emb, weight.t(), out=grad_logits)
                if mode != "forward":
                    grad_logits.matmul(weight)
                    grad_logits.t().matmul(emb)

        return step
    margin = MARGINS[spec["margin"]]()

    def step():
        loss = marginops.margin_cross_entropy(emb, weight, labels, margin, backend=provider)
        if mode != "forward":
            loss.backward()

    return step


def _inputs(spec, device, dtype, batch, classes, dim, grad):
    emb = torch.randn(batch, dim, device=device, dtype=dtype).requires_grad_(grad)
    weight = torch.randn(classes, dim, device=device, dtype=dtype).requires_grad_(grad)
    labels = torch.randint(0, classes, (batch,), device=device)
    return emb, weight, labels


def run(spec: dict) -> dict:
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    grad = spec["mode"] != "forward" and spec["provider"] != "matmul"
    # warm up on a tiny problem (kernel build/load, allocator) so it does not count in the peak
    build_step(spec, *_inputs(spec, device, dtype, 4, 64, spec["dim"], grad))()
    emb, weight, labels = _inputs(spec, device, dtype, spec["batch"], spec["classes"], spec["dim"], grad)
    step = build_step(spec, emb, weight, labels)
    grad_bytes = (emb.nbytes + weight.nbytes) if grad else 0
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) + grad_bytes
    else:
        # the gradients are outputs, not overhead: touch buffers of their size so the baseline has them
        probe = [torch.ones_like(emb), torch.ones_like(weight)] if grad else []
        del probe
        base = _peak_bytes(device)

    def timed_step():
        emb.grad = weight.grad = None  # fresh gradients each time: no accumulation buffer
        step()

    for _ in range(spec["warmup"]):
        timed_step()
    _sync(device)
    times = []
    deadline = time.perf_counter() + spec.get("max_seconds", 60.0)
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        timed_step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return {"times": times, "peak_extra_bytes": max(0, _peak_bytes(device) - base)}


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        result = run(spec)
    except torch.OutOfMemoryError as exc:
        result = {"error": "out of memory", "detail": str(exc).splitlines()[0]}
    except MemoryError:
        result = {"error": "out of memory", "detail": "MemoryError"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
