"""A small MLP diffusion head for continuous tokens (MAR's DiffLoss, re-written small): given the AR model's hidden
state z for a position, it denoises a token x in R^d with DDPM (per-step Gaussian mean and variance).

Every reverse step is Gaussian, x_{t-1} = mu(x_t, t, z) + sigma_t(x_t, t, z) * eps_t, which is what continuous
speculative decoding needs: the step means and standard deviations are exposed (:meth:`DiffusionHead.step`), the
noises can be supplied from outside (so draft and target heads can share them, "trajectory alignment"), and
:meth:`DiffusionHead.sample` records the whole trajectory.

Schedule: cosine alpha-bar over ``train_steps`` (Nichol & Dhariwal, 2021); sampling uses ``sample_steps`` evenly
respaced steps with their own betas. Variance (``variance``): "learned" (MAR's choice) - the network outputs v in
[0, 1] per dimension and log sigma^2 = v log beta_t + (1 - v) log beta~_t (the "learned range" parameterisation);
"fixed_small" - sigma^2 = beta~_t (the DDPM posterior variance); "fixed_large" - sigma^2 = beta_t. The network is
trained the same way for all three (the variance output is simply not read when fixed), so the choice can be changed
on a trained head. Fixed variances matter for continuous speculative decoding: two heads on the same schedule then
have identical per-step stds, so the surrogate ratio's std-product term is exactly 1 (docs/CSPD.md measures it).
Training loss: MSE on the predicted noise plus a weighted variational bound term that trains v only (the mean is
detached there). When
sampling, the clean token implied by the predicted noise is clipped to [-clip_x0, clip_x0] (tokens are standardised
latents) before the posterior mean is formed. The last reverse step also draws noise (sigma_1 > 0), so every step,
the last included, is a proper Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.errors import MulosdError
from mulosd.io import Pretrained


VARIANCES = ("learned", "fixed_small", "fixed_large")


@dataclass
class DiffusionHeadConfig:
    token_dim: int = 4  # channels of a continuous token
    cond_dim: int = 192  # the AR model's hidden size
    width: int = 256
    depth: int = 3  # residual MLP blocks
    train_steps: int = 1000
    sample_steps: int = 25
    vlb_weight: float = 0.001  # weight of the variational-bound term (it trains the variance only)
    clip_x0: float = 5.0  # the predicted clean token is clipped to [-clip_x0, clip_x0] when sampling (0 = off)
    variance: str = "learned"  # per-step std when sampling: "learned", "fixed_small" (beta~), "fixed_large" (beta)

    def __post_init__(self):
        for name in ("token_dim", "cond_dim", "width", "depth", "train_steps", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MulosdError(f"DiffusionHeadConfig.{name} must be an integer >= 1, got {v!r}")
        if self.sample_steps > self.train_steps:
            raise MulosdError(f"sample_steps ({self.sample_steps}) cannot exceed train_steps ({self.train_steps})")
        if self.variance not in VARIANCES:
            raise MulosdError(f"variance must be one of {', '.join(VARIANCES)}, got {self.variance!r}")


def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """alpha-bar_t for t = 0 .. steps (alpha-bar_0 = 1), float64, clipped so no beta exceeds 0.999."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    return torch.cat([ab.new_ones(1), torch.cumprod(1 - betas, 0)])


class Schedule:
    """The betas of a chain of ``len(timesteps)`` reverse steps over the given training timesteps (ascending), and
    the per-step constants of the reverse Gaussian as plain floats (read once per step, no tensor indexing)."""

    def __init__(self, alpha_bar: torch.Tensor, timesteps: torch.Tensor):
        ab = alpha_bar[timesteps]  # alpha-bar at each kept step
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.timesteps = timesteps  # training timestep index (1..T) of each kept step, ascending
        self.alpha_bar, self.alpha_bar_prev = ab, ab_prev
        self.betas = (1 - ab / ab_prev).clamp(1e-12, 0.999)
        self.post_var = self.betas * (1 - ab_prev) / (1 - ab)  # beta~
        self.post_var[0] = self.betas[0] * 0.5 if len(ab) > 1 else self.betas[0]  # beta~_1 = 0: use a floor
        self.post_var = torch.maximum(self.post_var, self.betas[:1] * 0.5)
        # x0 = (x - sqrt(1 - ab) eps) / sqrt(ab);  mean = c0 x0 + ct x;  log var = lerp(log beta~, log beta, v)
        self.k_noise = (1 - ab).sqrt().tolist()
        self.k_inv = (1 / ab.sqrt()).tolist()
        self.c0 = (ab_prev.sqrt() * self.betas / (1 - ab)).tolist()
        self.ct = ((1 - self.betas).sqrt() * (1 - ab_prev) / (1 - ab)).tolist()
        self.log_beta = self.betas.log().tolist()
        self.log_post_var = self.post_var.log().tolist()

    def __len__(self) -> int:
        return len(self.timesteps)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """LayerNorm -> (shift, scale, gate) from the condition -> MLP, residual (adaLN, as MAR's head). The modulation
    depends on the condition only, so sampling computes it for every step at once (:meth:`modulation`)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def modulation(self, c):
        """(shift, 1 + scale, gate) for condition c."""
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward(self, x, shift, scale1, gate):
        return x + gate * self.mlp(self.norm(x) * scale1 + shift)


class DiffusionHead(Pretrained, nn.Module):
    config_class = DiffusionHeadConfig
    kind = "diffusion_head"

    def __init__(self, config: DiffusionHeadConfig):
        super().__init__()
        self.config = c = config
        self.inp = nn.Linear(c.token_dim, c.width)
        self.time = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.cond = nn.Linear(c.cond_dim, c.width)
        self.blocks = nn.ModuleList(ResBlock(c.width) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width, elementwise_affine=False)
        self.out = nn.Linear(c.width, 2 * c.token_dim)  # predicted noise, variance interpolation v
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for b in self.blocks:
            nn.init.zeros_(b.ada[1].weight)
            nn.init.zeros_(b.ada[1].bias)
        self.register_buffer("alpha_bar", cosine_alpha_bar(c.train_steps), persistent=False)
        self.sampling = self.schedule(c.sample_steps)

    def schedule(self, steps: int) -> Schedule:
        T = self.config.train_steps
        if not 1 <= steps <= T:
            raise MulosdError(f"diffusion sampling steps must be in [1, {T}], got {steps}")
        ts = torch.linspace(1, T, steps).round().long() if steps > 1 else torch.tensor([T])
        return Schedule(cosine_alpha_bar(T), ts)

    def _trunk(self, x: torch.Tensor, mods) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (predicted noise, raw variance output in [-1, 1] before the map v = (raw + 1) / 2)."""
        h = self.inp(x)
        for b, (shift, scale1, gate) in zip(self.blocks, mods):
            h = b(h, shift, scale1, gate)
        return self.out(self.out_norm(h)).chunk(2, dim=-1)

    def net(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] noisy tokens, t [N] training timesteps, z [N, cond_dim] -> (predicted noise, v in [0, 1])."""
        c = self.time(timestep_embedding(t.to(x.device), self.config.width)) + self.cond(z)
        eps, raw = self._trunk(x, [b.modulation(c) for b in self.blocks])
        return eps, (raw + 1) / 2

    @staticmethod
    def _gaussian(x, eps, v, i: int, s: Schedule, clip: float, variance: str = "learned"):
        """The reverse step's (mean, std) at x from the predicted noise and variance interpolation."""
        x0 = (x - s.k_noise[i] * eps) * s.k_inv[i]
        if clip > 0:  # near t = T, 1/sqrt(alpha-bar) magnifies any error in the predicted noise
            x0 = x0.clamp(-clip, clip)
        mean = s.c0[i] * x0 + s.ct[i] * x
        if variance != "learned":  # a fixed variance: the v output is not read
            v = torch.full_like(v, 0.0 if variance == "fixed_small" else 1.0)
        std = (0.5 * (s.log_post_var[i] + v * (s.log_beta[i] - s.log_post_var[i]))).exp()
        return mean, std

    # -- sampling ------------------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, i: int, z: torch.Tensor, sched: Schedule | None = None):
        """Reverse step ``i`` (0-based index into the schedule, counted from the clean end) at x [N, d]:
        returns (mean, std) of the Gaussian over the previous, less noisy x."""
        s = sched or self.sampling
        eps, v = self.net(x, s.timesteps[i].expand(len(x)), z)
        return self._gaussian(x, eps, v, i, s, self.config.clip_x0, self.config.variance)

    def sample(self, z: torch.Tensor, noise: torch.Tensor | None = None, temperature: float = 1.0,
               sched: Schedule | None = None, cfg_scale: float | None = None) -> dict:
        """Draw one token per row: z [N, cond_dim], or [2N, cond_dim] laid out [cond ; uncond] with ``cfg_scale``
        (classifier-free guidance on the predicted noise, eps_u + s (eps_c - eps_u), variance from the conditional
        half, as MAR). ``noise`` [S + 1, N, d]: noise[0] starts the chain (x_T), noise[k] drives reverse step k
        (from the noisy end); drawn here if not given. ``temperature`` (> 0) scales every step's std (MAR's
        sampling temperature).

        Returns {"x" [N, d], "noise", "last_mean", "last_std" (the Gaussian of the final step, which produced x),
        "log_std_prefix" [N] (sum of log std over the earlier steps and the token's dimensions)}: what continuous
        speculative decoding's ratio needs."""
        s = sched or self.sampling
        S, d = len(s), self.config.token_dim
        guided = cfg_scale is not None
        n = len(z) // 2 if guided else len(z)
        if guided and len(z) != 2 * n:
            raise MulosdError(f"guided sampling needs [cond ; uncond] rows (an even count), got {len(z)}")
        if not temperature > 0:
            raise MulosdError(f"diffusion sampling needs temperature > 0, got {temperature}")
        if noise is None:
            noise = torch.randn(S + 1, n, d, device=z.device)
        if noise.shape != (S + 1, n, d):
            raise MulosdError(f"noise must have shape {(S + 1, n, d)}, got {tuple(noise.shape)}")
        # the condition does not depend on x: modulate every step of every block in one batched call each
        t = s.timesteps.to(z.device)
        c = self.time(timestep_embedding(t, self.config.width))[:, None] + self.cond(z)[None]  # [S, rows, w]
        mods = [b.modulation(c) for b in self.blocks]
        clip = self.config.clip_x0
        fixed = {"fixed_small": -1.0, "fixed_large": 1.0}.get(self.config.variance)  # the raw output a fixed variance means
        x, log_std_prefix = noise[0], 0.0
        log_temp = math.log(temperature)
        for k, i in enumerate(range(S - 1, -1, -1)):
            # the reverse Gaussian of :meth:`_gaussian`, fused for speed (batch-1 decoding is overhead-bound):
            # log std = 0.5 lerp(log beta~, log beta, (raw + 1) / 2) + log temperature = a + b * raw
            eps, raw = self._trunk(torch.cat([x, x]) if guided else x, [(a[i], b[i], g[i]) for a, b, g in mods])
            if guided:
                cond, uncond = eps.chunk(2)
                eps, raw = torch.lerp(uncond, cond, cfg_scale), raw[:n]
            half = 0.25 * (s.log_beta[i] - s.log_post_var[i])
            if fixed is not None:
                raw = torch.full_like(raw, fixed)
            log_std = raw.mul(half).add_(0.5 * s.log_post_var[i] + half + log_temp)
            x0 = torch.add(x, eps, alpha=-s.k_noise[i]).mul_(s.k_inv[i])
            if clip > 0:  # near t = T, 1/sqrt(alpha-bar) magnifies any error in the predicted noise
                x0 = x0.clamp_(-clip, clip)
            mean = x0.mul_(s.c0[i]).add_(x, alpha=s.ct[i])
            std = log_std.exp()
            if k < S - 1:
                log_std_prefix = log_std_prefix + log_std.sum(-1)
            x = torch.addcmul(mean, std, noise[k + 1])
        if not bool(torch.isfinite(x).all()):
            raise MulosdError(f"the diffusion head produced NaN or inf while sampling ({S} steps, "
                              f"t from {int(s.timesteps[-1])} to {int(s.timesteps[0])}); check the model weights and inputs")
        return {"x": x, "noise": noise, "last_mean": mean, "last_std": std,
                "log_std_prefix": torch.zeros(n, device=x.device) if S == 1 else log_std_prefix}

    # -- training ------------------------------------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """DDPM loss at a random training timestep per row: MSE on the noise + vlb_weight * KL (variance only)."""
        T = self.config.train_steps
        t = torch.randint(1, T + 1, (len(x0),)).to(x0.device)  # the global CPU generator's draws on every device
        ab_all = self.alpha_bar.to(torch.float64)
        ab, ab_prev = ab_all[t].float()[:, None], ab_all[t - 1].float()[:, None]
        noise = torch.randn_like(x0)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps, v = self.net(xt, t, z)
        mse = F.mse_loss(eps, noise)
        beta = (1 - ab / ab_prev).clamp(1e-12, 0.999)
        floor = 0.5 * (1 - ab_all[1]).float()  # the same floor as Schedule: beta~ vanishes at t = 1
        post_var = torch.maximum(beta * (1 - ab_prev) / (1 - ab), floor)
        true_mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xt
        x0_hat = (xt - (1 - ab).sqrt() * eps.detach()) / ab.sqrt()
        model_mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0_hat + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xt
        log_var = v * beta.log() + (1 - v) * post_var.log()
        kl = 0.5 * (log_var - post_var.log() + (post_var + (true_mean - model_mean) ** 2) / log_var.exp() - 1)
        vlb = kl.mean()
        return mse + self.config.vlb_weight * vlb, {"mse": mse.item(), "vlb": vlb.item()}


def trajectory_kl(teacher: DiffusionHead, student: DiffusionHead, z_teacher: torch.Tensor, z_student: torch.Tensor,
                  noise: torch.Tensor, cfg_scale: float | None = None, temperature: float = 1.0,
                  aligned: bool = False) -> dict:
    """How far the student's reverse chain is from the teacher's, along the teacher's own trajectory.

    The teacher's chain is run from ``noise`` (as :meth:`DiffusionHead.sample`: noise[0] is x_T, noise[k] drives
    step k; guidance on the predicted noise when ``cfg_scale`` is given, z laid out [cond ; uncond]); at every x_k
    it visits, both heads' reverse Gaussians are formed and their KL summed over steps and dimensions:
    KL(P || Q) = sum_k E_P KL(p_k(. | x_k) || q_k(. | x_k)), the KL between the two chains' path distributions,
    which is 0 iff the student predicts the teacher's noise (and variance) at every step of every trajectory. With
    fixed variances each term is ||mu_p - mu_q||^2 / (2 sigma_k^2): an error in the mean costs most at the last
    step, whose sigma is smallest (the step continuous speculative decoding's ratio compares); in units of the
    predicted noise, the weight (c0 k_inv k_noise)^2 / (2 sigma_k^2) is about 1 at the last step and largest at the
    noisy end (where clipping x0, if on, cuts the gradient). Computed in float32 outside any autocast (the last
    step's sigma is below bfloat16's resolution at |x| ~ 1). Gradients reach the student (and z_student) only; the
    trajectory itself is the teacher's, detached.

    ``aligned=True`` compares the two chains as continuous speculative decoding's trajectory alignment runs them:
    each head follows its own chain from the same noises (the student's with gradients through every step), and the
    same per-step terms are taken between the student's Gaussian at its x_k and the teacher's at its own. With equal
    fixed variances the last term is exactly -E log r~, minus the expected log of CSpD's aligned ratio, so this
    also charges the drift that earlier steps leave in x_1, which the teacher-forced sum cannot see.

    Returns {"kl" [n] nats per token, "last_gap" [n]: ||mu_p - mu_q|| / sigma_p at the last step, in units of the
    teacher's last std}."""
    s, sq = teacher.sampling, student.sampling
    if not torch.equal(s.timesteps, sq.timesteps) or teacher.config.train_steps != student.config.train_steps:
        raise MulosdError("the two heads must share their schedule (training and sampling timesteps) to be compared "
                          "step by step")
    guided = cfg_scale is not None
    n = len(z_teacher) // 2 if guided else len(z_teacher)
    S = len(s)
    if len(z_student) != len(z_teacher) or (guided and len(z_teacher) != 2 * n):
        raise MulosdError(f"trajectory_kl needs as many student as teacher conditions ([cond ; uncond] rows, an even "
                          f"count, with cfg_scale), got {len(z_teacher)} and {len(z_student)}")
    if noise.shape != (S + 1, n, teacher.config.token_dim):
        raise MulosdError(f"noise must have shape {(S + 1, n, teacher.config.token_dim)}, got {tuple(noise.shape)}")
    if not temperature > 0:
        raise MulosdError(f"trajectory_kl needs temperature > 0, got {temperature}")
    with torch.autocast(noise.device.type, enabled=False):
        return _trajectory_kl(teacher, student, z_teacher.float(), z_student.float(), noise.float(), cfg_scale,
                              temperature, guided, n, S, aligned)


def _trajectory_kl(teacher, student, z_teacher, z_student, noise, cfg_scale, temperature, guided, n, S,
                   aligned=False) -> dict:
    s, sq = teacher.sampling, student.sampling
    x, total = noise[0], 0.0
    xs = x  # the student's own state (aligned); the teacher's otherwise
    for k, i in enumerate(range(S - 1, -1, -1)):
        xin = torch.cat([x, x]) if guided else x
        xsin = torch.cat([xs, xs]) if guided else xs
        t = s.timesteps[i].to(x.device).expand(len(xin))
        with torch.no_grad():
            ep, vp = teacher.net(xin, t, z_teacher)
        eq, vq = student.net(xsin, t, z_student)
        if guided:
            ep, vp = torch.lerp(ep[n:], ep[:n], cfg_scale), vp[:n]
            eq, vq = torch.lerp(eq[n:], eq[:n], cfg_scale), vq[:n]
        mp, sp = DiffusionHead._gaussian(x, ep, vp, i, s, teacher.config.clip_x0, teacher.config.variance)
        mq, sd = DiffusionHead._gaussian(xs, eq, vq, i, sq, student.config.clip_x0, student.config.variance)
        sp, sd = sp * temperature, sd * temperature
        total = total + (sd.log() - sp.log() + (sp**2 + (mp - mq) ** 2) / (2 * sd**2) - 0.5).sum(-1)
        x = (mp + sp * noise[k + 1]).detach()
        xs = mq + sd * noise[k + 1] if aligned else x
    gap = ((mp - mq) / sp).pow(2).sum(-1).sqrt()
    return {"kl": total, "last_gap": gap}
