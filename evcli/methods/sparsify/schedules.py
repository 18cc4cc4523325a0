"""The schedules of the sparsify methods as pure functions of the (possibly fractional) epoch.

* LBC gradual removal: combinations left per group after epoch e.
* OptG sigmoid: target sparsity and mask-lr factor of epoch e.
* Gradual magnitude pruning (Zhu & Gupta cubic ramp) for the magnitude baseline.
"""

from __future__ import annotations

import math


def lbc_remaining(epoch: float, combos: int, t_i: float, t_f: float, power: int) -> int:
    """Surviving combinations per group: ``1 + ceil((C-1) (1 - (e - t_i)/(t_f - t_i))^p)``, C before t_i, 1 from t_f."""
    if combos <= 1 or epoch >= t_f:
        return 1
    if epoch < t_i:
        return combos
    frac = 1.0 - (epoch - t_i) / (t_f - t_i)
    # plain float arithmetic, as the reference code and the card's table: (1 - 20/60)^3 * 27 is 8.000000000000002
    # there, so 2:8 keeps 10 combinations at epoch 20 (exact arithmetic would give 9)
    return 1 + math.ceil((combos - 1) * frac**power)


def lbc_removed(epoch: float, combos: int, t_i: float, t_f: float, power: int) -> int:
    """k: the number of lowest-scored combinations zeroed in every group (only grows, ends at C-1)."""
    return combos - lbc_remaining(epoch, combos, t_i, t_f, power)


def sigmoid(x: float) -> float:
    """Numerically safe logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def optg_sparsity(epoch: float, epochs: float, target: float, beta: float) -> float:
    """OptG's sparsity of epoch e: ``p * sigmoid(beta (e - E/2))``."""
    return target * sigmoid(beta * (epoch - epochs / 2.0))


def optg_mask_lr_factor(epoch: float, epochs: float, beta: float) -> float:
    """OptG's supermask optimizer: mask lr = lr * sigmoid(beta (e - E/2))."""
    return sigmoid(beta * (epoch - epochs / 2.0))


def cubic_sparsity(epoch: float, target: float, t_i: float, t_f: float) -> float:
    """Gradual magnitude pruning: ``s_f (1 - (1 - (e - t_i)/(t_f - t_i))^3)``, 0 before t_i, s_f from t_f."""
    if epoch < t_i:
        return 0.0
    if epoch >= t_f or t_f <= t_i:
        return target
    return target * (1.0 - (1.0 - (epoch - t_i) / (t_f - t_i)) ** 3)
