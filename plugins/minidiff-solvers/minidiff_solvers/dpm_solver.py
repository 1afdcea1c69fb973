"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2 (multistep, second order, data prediction).

The paper steps in lambda_t = log(alpha_t / sigma_t), the half log-SNR. For minidiff's VP
schedule alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), so alpha_t / sigma_t is
1 / sigma where sigma is the sigma view's noise level (``minidiff_solvers.sigmas``):
lambda = -log sigma. The paper's update of the VP x_t,

    x_{t_i} = (sigma_{t_i} / sigma_{t_i-1}) x_{t_i-1} - alpha_{t_i} (e^{-h_i} - 1) D_i,

divided through by alpha_{t_i} is, for the sigma view's x = x_t / alpha_t,

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - (e^{-h_i} - 1) D_i,    h_i = lambda_i - lambda_{i-1},

with D_i = x0(x_{i-1}) on a first-order step (DPM-Solver++(1), which is DDIM) and otherwise
D_i = (1 + 1/(2 r_i)) x0(x_{i-1}) - 1/(2 r_i) x0(x_{i-2}), r_i = h_{i-1} / h_i.
"""

from __future__ import annotations

import math


def sample_dpmpp_2m(model, x, sigmas, callback=None, steps=None):
    """DPM-Solver++(2M) over ``sigmas`` (descending, ending at 0); one model call per step.

    First order on the first step (there is no x0 before it) and on the step to sigma = 0,
    where lambda = +inf and the second-order term has no limit: that step is x = D, the
    model's own x0. Every other step is second order. This is k-diffusion's ``sample_dpmpp_2m``
    and diffusers' ``DPMSolverMultistepScheduler`` (solver_order=2, final_sigmas_type="zero"),
    whose ``lower_order_final`` only touches the step to sigma = 0, first order anyway.
    ``steps`` (a range, default all) picks the steps to take; the first of them is first order.
    """
    denoised_prev, h_prev = None, None
    for i in steps or range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, _ = model(x, sigma)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf  # lambda_next - lambda
        if denoised_prev is None or sigma_next == 0:
            d = denoised
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * d  # -(e^{-h} - 1) = 1 - sigma_next / sigma
        denoised_prev, h_prev = denoised, h
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})
    return x
