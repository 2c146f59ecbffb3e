"""Whole-wave grid planning of the Triton launchers (launch.py): pure integer arithmetic, no triton import,
so that tests/test_gpu_static.py can check it without loading the kernels.

A grid of ``units`` programs per class split and s splits runs in ceil(units * s / slots) waves on ``slots``
resident programs (SMs x CTAs per SM of the compiled kernel); the idle share of the last wave is the loss.
``whole_wave_splits`` searches s in [1, cap] for the least loss, with
cap = min(max(ceil(waves * slots / units), MIN_SPLIT_CHOICES), limit): up to ``waves`` waves, and at least
MIN_SPLIT_CHOICES split counts to choose from, so that one split's programs are a small share of the grid and
some s lands close to a whole number of waves (>= 0.92 efficiency for every units <= 2000 and slots from 100
to 4 x 132; tests/test_gpu_static.py).  Only ``limit`` (the partials' memory, the class tiles) can cost more.
The CTAs per SM come from configs._DEFAULT_CTAS_PER_SM (the default candidates' compiled occupancy, checked
against bench.gpu_static's report).
"""

MIN_SPLIT_CHOICES = 16


def whole_wave_splits(units: int, slots: int, waves: int, limit: int) -> int:
    """How many class splits a grid of ``units`` programs per split gets (the rule: module docstring): the s in
    [1, cap] with the largest wave efficiency units * s / (ceil(units * s / slots) * slots); ties go to the
    larger s (more parallelism, shorter programs).  Pure integer arithmetic."""
    units, slots = max(1, units), max(1, slots)
    cap = max(1, min(max(-(-waves * slots // units), MIN_SPLIT_CHOICES), limit))
    best, best_loss = 1, None
    for s in range(1, cap + 1):
        ctas = units * s
        loss = (-ctas % slots, -(-ctas // slots))  # idle slots of the last wave, waves
        # loss[0] / loss[1] <= best[0] / best[1] without floats
        if best_loss is None or loss[0] * best_loss[1] <= best_loss[0] * loss[1]:
            best, best_loss = s, loss
    return best
