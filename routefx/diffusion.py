"""Diffusion objectives (rectified flow, EDM), ODE samplers and guidance.

Rectified flow (SiT-style linear interpolant): `x_t = (1 - t) x0 + t eps`, `t` in [0, 1], the
network predicts the velocity `v = eps - x0` and sampling integrates `dx/dt = v` from `t = 1`
(noise) to `t = 0` (data). The network sees the time as `1000 t` (DiT's timestep range).

EDM (Karras et al. 2022): `x = x0 + sigma n`, the network `F` is preconditioned
(`D = c_skip x + c_out F(c_in x, c_noise)`) and trained on the equivalent unweighted target
`(x0 - c_skip x) / c_out`; sampling integrates `dx/dsigma = (x - D) / sigma` on Karras' grid.

Guidance works on the raw network output (both ODEs are affine in it): classifier-free guidance
against the null class, or TREAD's routing guidance (TREAD.md section 3):
`out = out(weak) + w * (out(strong) - out(weak))` with forced routing at two ratios.

Example:
    >>> import torch
    >>> rf = RectifiedFlow()
    >>> net = lambda x, t, y: torch.zeros_like(x)
    >>> sample(net, rf, torch.zeros(2, dtype=torch.long), (1, 8, 8), steps=4).shape
    torch.Size([2, 1, 8, 8])
"""
import dataclasses

import torch

from .api import force_routing

__all__ = ["NoisyBatch", "RectifiedFlow", "EDM", "OBJECTIVES", "make_objective", "Guidance",
           "predict", "sample"]


@dataclasses.dataclass
class NoisyBatch:
    """One training example set: network inputs, regression target, optional per-sample weight."""

    x_in: torch.Tensor      # (B, C, H, W) what the network sees
    t_in: torch.Tensor      # (B,) the network's time input
    target: torch.Tensor    # (B, C, H, W) what the network should output
    x_noisy: torch.Tensor   # (B, C, H, W) the noisy image (for MAE-style targets)
    weight: torch.Tensor = None


def _randn(shape, like, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


class RectifiedFlow:
    """Linear interpolant `x_t = (1 - t) x0 + t eps`, velocity target `eps - x0`."""

    name = "rf"

    def __init__(self, t_sampling: str = "logit-normal", time_scale: float = 1000.0):
        if t_sampling not in ("logit-normal", "uniform"):
            raise ValueError(f"t_sampling {t_sampling!r}: use 'logit-normal' or 'uniform'")
        self.t_sampling, self.time_scale = t_sampling, time_scale

    def noisy(self, x0: torch.Tensor, generator=None) -> NoisyBatch:
        b = x0.shape[0]
        if self.t_sampling == "logit-normal":
            t = torch.sigmoid(_randn((b,), x0, generator))
        else:
            t = torch.rand((b,), generator=generator, device=x0.device, dtype=x0.dtype)
        eps = _randn(x0.shape, x0, generator)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tb) * x0 + tb * eps
        return NoisyBatch(x_t, t * self.time_scale, eps - x0, x_t)

    def grid(self, steps: int, device=None) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, steps + 1, device=device)

    def prior(self, shape, generator=None, device=None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def net_inputs(self, x, t):
        return x, (t * self.time_scale).expand(x.shape[0])

    def derivative(self, x, t, out):
        return out


class EDM:
    """Karras et al. (2022) preconditioning, log-normal training sigmas, Karras sampling grid."""

    name = "edm"

    def __init__(self, sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0,
                 rho=7.0, time_scale=250.0):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho, self.time_scale = sigma_min, sigma_max, rho, time_scale

    def _coeffs(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() * self.time_scale  # c_noise = ln(sigma)/4 * 1000

    def noisy(self, x0: torch.Tensor, generator=None) -> NoisyBatch:
        b = x0.shape[0]
        sigma = (_randn((b,), x0, generator) * self.p_std + self.p_mean).exp()
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x = x0 + _randn(x0.shape, x0, generator) * s
        c_skip, c_out, c_in, c_noise = self._coeffs(s)
        return NoisyBatch(c_in * x, c_noise.flatten(), (x0 - c_skip * x) / c_out, x)

    def grid(self, steps: int, device=None) -> torch.Tensor:
        i = torch.arange(steps, dtype=torch.float64, device=device) / max(steps - 1, 1)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sig = (hi + i * (lo - hi)) ** self.rho
        return torch.cat([sig, sig.new_zeros(1)]).float()

    def prior(self, shape, generator=None, device=None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device) * self.sigma_max

    def net_inputs(self, x, sigma):
        _, _, c_in, c_noise = self._coeffs(sigma)
        return c_in * x, c_noise.expand(x.shape[0])

    def derivative(self, x, sigma, out):
        c_skip, c_out, _, _ = self._coeffs(sigma)
        return (x - (c_skip * x + c_out * out)) / sigma


OBJECTIVES = {"rf": RectifiedFlow, "edm": EDM}


def make_objective(name: str, **kw):
    """`"rf"` (rectified flow) or `"edm"`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kw)


@dataclasses.dataclass
class Guidance:
    """How to combine network calls. `cfg` > 1: classifier-free guidance against `null_class`.
    `routing` True: routing guidance `weak + scale * (strong - weak)` at forced ratios."""

    cfg: float = 1.0
    null_class: int = None
    routing: bool = False
    scale: float = 1.5
    strong: float = 0.3
    weak: float = 0.7

    def __post_init__(self):
        if self.routing and self.cfg != 1.0:
            raise ValueError("Use either classifier-free guidance (cfg) or routing guidance, not both.")
        if self.cfg != 1.0 and self.null_class is None:
            raise ValueError("Classifier-free guidance needs the null class label (null_class).")


def predict(net, x, t_in, y, guidance: Guidance = None, channels: int = None):
    """The (guided) network output for one ODE evaluation; keeps the first `channels` channels."""
    g = guidance or Guidance()
    call = lambda *a: net(*a)[:, :channels or x.shape[1]]  # noqa: E731 - drop learned-sigma channels
    if g.routing:
        with force_routing(net, ratio=g.strong):
            strong = call(x, t_in, y)
        with force_routing(net, ratio=g.weak):
            weak = call(x, t_in, y)
        return weak + g.scale * (strong - weak)
    if g.cfg != 1.0:
        out = call(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([y, torch.full_like(y, g.null_class)]))
        cond, uncond = out.chunk(2)
        return uncond + g.cfg * (cond - uncond)
    return call(x, t_in, y)


@torch.no_grad()
def sample(net, objective, labels, shape, steps=50, sampler="euler", guidance=None, generator=None,
           noise=None):
    """Integrate the probability-flow ODE from noise to images.

    Args:
        net: `net(x, t, y)` (a backbone, routed by `routefx.apply` for routing guidance).
        objective: a `RectifiedFlow` or `EDM`.
        labels: (B,) long class labels (device of the result).
        shape: (C, H, W) of one image.
        steps: ODE steps (Heun uses about twice as many network calls).
        sampler: "euler" or "heun".
        guidance: a `Guidance` (default: none).
        generator / noise: the starting noise's generator, or the noise itself.
    Returns:
        (B, C, H, W) samples (not clamped).
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler {sampler!r}: use 'euler' or 'heun'")
    dev = labels.device
    x = noise if noise is not None else objective.prior((len(labels), *shape), generator, "cpu").to(dev)
    ts = objective.grid(steps, device=dev)

    def deriv(x, t):
        out = predict(net, *objective.net_inputs(x, t), labels, guidance, channels=shape[0])
        return objective.derivative(x, t, out)

    for t, t_next in zip(ts[:-1], ts[1:]):
        d = deriv(x, t)
        x_next = x + (t_next - t) * d
        if sampler == "heun" and t_next > 0:
            x_next = x + (t_next - t) * 0.5 * (d + deriv(x_next, t_next))
        x = x_next
    return x
