"""Euler, Heun and Euler ancestral over the probability-flow ODE in the sigma view.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models":
with x = x_0 + sigma eps, the ODE is dx/dsigma = (x - D(x; sigma)) / sigma (eq. 3, sigma(t) = t,
s(t) = 1), and its slope d is the predicted eps. ``model(x, sigma)`` returns (D, d); ``sigmas``
descends from the first level to 0 (see ``minidiff_solvers.sigmas``). Each function is the
loop of its algorithm and calls ``callback({"i", "sigma", "sigma_next", "x", "denoised"})``
after each step, with x in the sigma view. ``steps`` (a range, default all) picks which steps
of the grid to take, for runs that start or stop part way.
"""

from __future__ import annotations

import math


def sample_euler(model, x, sigmas, callback=None, steps=None):
    """Euler's method, one model call per step: Karras et al. 2022, Algorithm 1 without its
    second-order correction (their Euler baseline). On the schedule's own levels this is DDIM."""
    for i in steps or range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, d = model(x, sigma)
        x = x + (sigma_next - sigma) * d
        _report(callback, i, sigma, sigma_next, x, denoised)
    return x


def sample_heun(model, x, sigmas, callback=None, steps=None):
    """Heun's 2nd-order method: Karras et al. 2022, Algorithm 1 with sigma(t) = t and s(t) = 1,
    which is their Algorithm 2 with S_churn = 0.

    The slope is averaged with the slope where the Euler step lands. Two steps
    stay Euler: the last, to sigma = 0, where the slope is undefined (as in Algorithm 2), and
    the first. minidiff starts at the schedule's sigma_max, which is 20291 for the cosine
    schedule, and the first step drops to a few units: the slope is constant over all but the
    end of that span, so the trapezoid rule, which gives the end's slope half the weight, is off
    by (sigma_0 - sigma_1) (d_0 - d_1) / 2 (ten times the data's std on the Gaussian check at 10
    steps), while the Euler step is exact up to O(sigma_data^2 / sigma_1) there.
    2 * steps - 2 model calls in all (1 for a single step). A run that starts part way
    (``steps`` not from 0) starts below sigma_max and takes Heun steps from its first step.
    """
    for i in steps or range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, d = model(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        if i == 0 or sigma_next == 0:
            x = x_euler
        else:
            _, d_next = model(x_euler, sigma_next)  # the slope where Euler landed
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        _report(callback, i, sigma, sigma_next, x, denoised)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): move deterministically to sigma_down, then add noise of std sigma_up.

    In the sigma view, q(x_next | x, x_0) is Gaussian with mean x_0 + (sigma_next / sigma)^2 (x - x_0)
    and variance sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (the VE counterpart of Ho et al.
    2020, eq. 7). sigma_up is eta times that std; sigma_down = sqrt(sigma_next^2 - sigma_up^2) keeps
    the total noise at sigma_next. At eta = 1 an Euler step to sigma_down = sigma_next^2 / sigma lands
    exactly on the posterior mean; at eta = 0 it is plain Euler.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = eta * sigma_next * math.sqrt(max(0.0, sigma ** 2 - sigma_next ** 2)) / sigma
    return math.sqrt(max(0.0, sigma_next ** 2 - up ** 2)), up


def sample_euler_ancestral(model, x, sigmas, noise, eta: float = 1.0, callback=None, steps=None):
    """Euler steps to sigma_down plus fresh noise of std sigma_up; ``noise(x)`` draws N(0, I) like x."""
    for i in steps or range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, d = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * d
        if sigma_up > 0:
            x = x + sigma_up * noise(x)
        _report(callback, i, sigma, sigma_next, x, denoised)
    return x


def _report(callback, i, sigma, sigma_next, x, denoised) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})
