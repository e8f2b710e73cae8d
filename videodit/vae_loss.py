"""The VAE training objective: foreground-weighted L1 + multi-scale SSIM + KL + an optional 3D PatchGAN.

No pretrained network is needed (or available offline), so the perceptual term is a multi-scale SSIM loss: 1 - SSIM
averaged over a few dyadic scales of every frame. It is a structural similarity loss, not LPIPS.

Trainer use:
    loss_fn = VAELoss(foreground_weight=4.0, gan_weight=0.5, gan_start=2000)
    recon, posterior = vae(x)
    loss, logs = loss_fn(x, recon, posterior, step, last_layer=vae.decoder.conv_out.conv.weight)
    d_loss, d_logs = loss_fn.disc_loss(x, recon, step)   # None before gan_start; optimize loss_fn.discriminator
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import VAEConfig


def foreground_weight(x: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weight (B, 1, T, H, W): 1 on the background, up to 1 + weight on pixels whose colour is
    farther than `threshold` (in [-1, 1] units, max over channels) from the median colour of the frame's border.
    Small flat objects are a tiny share of the pixels; without this a plain L1 learns the background first."""
    # x: (B, 3, T, H, W)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, T, 2W + 2H)
    background = border.median(dim=-1).values[..., None, None]  # (B, 3, T, 1, 1)
    distance = (x - background).abs().amax(dim=1, keepdim=True)  # (B, 1, T, H, W)
    return 1 + weight * (distance / threshold).clamp(max=1)


def _gaussian_window(size, sigma, device, dtype):
    g = torch.exp(-((torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of images x, y: (N, C, H, W) in [-1, 1] (data range 2), Gaussian window, no padding."""
    C = x.shape[1]
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    gh, gw = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)

    def blur(v):  # separable depthwise Gaussian
        return F.conv2d(F.conv2d(v, gh, groups=C), gw, groups=C)

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


def ms_ssim_loss(x: torch.Tensor, recon: torch.Tensor, scales: int = 3, window: int = 7) -> torch.Tensor:
    """1 - SSIM averaged over up to `scales` dyadic scales of every frame; x, recon: (B, 3, T, H, W)."""
    x, recon = (rearrange(v, "b c t h w -> (b t) c h w") for v in (x, recon))
    losses = []
    for _ in range(scales):
        if min(x.shape[-2:]) < window:
            break
        losses.append(1 - ssim(x, recon, window))
        x, recon = F.avg_pool2d(x, 2), F.avg_pool2d(recon, 2)
    return torch.stack(losses).mean() if losses else x.new_zeros(())


def kl_loss(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) averaged over latent elements (diffusers' .kl() sums over only dims 1-3)."""
    return 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: strided 3D convs to a (B, 1, T', H', W') map of real/fake logits, one per space-time patch."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv3d(in_channels, channels, 3, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(1, layers):
            blocks += [nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x):
        # x: (B, 3, T, H, W) -> logits (B, 1, T', H', W')
        return self.net(x)


class VAELoss(nn.Module):
    """loss = L1 (foreground-weighted mean) + perceptual_weight * (1 - multi-scale SSIM)
              + kl_weight * KL (mean per latent element) + GAN weight * (-D(recon)) from `gan_start` on.
    The arguments are the config's `vae.*` keys, with their defaults.
    foreground_weight: extra weight on pixels far from the border's median colour (0 turns it off).
    gan_weight: 0 builds no discriminator; with a `last_layer` the GAN weight is
        gan_weight * |grad L_rec| / |grad L_gan| at the decoder's last layer (as VQGAN), else gan_weight."""

    def __init__(self, perceptual_weight: float = VAEConfig.perceptual_weight, kl_weight: float = VAEConfig.kl_weight,
                 foreground_weight: float = VAEConfig.foreground_weight, gan_weight: float = VAEConfig.gan_weight,
                 gan_start: int = VAEConfig.gan_start):
        super().__init__()
        self.perceptual_weight, self.kl_weight, self.foreground_weight = perceptual_weight, kl_weight, foreground_weight
        self.gan_weight, self.gan_start = gan_weight, gan_start
        self.discriminator = PatchDiscriminator3D() if gan_weight > 0 else None

    def reconstruction(self, x, recon):
        err = (x - recon).abs()  # (B, 3, T, H, W)
        if self.foreground_weight <= 0:
            return err.mean()
        w = foreground_weight(x, self.foreground_weight)
        return (err * w).mean() / w.mean()

    def forward(self, x: torch.Tensor, recon: torch.Tensor, posterior, step: int = 0,
                last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        rec = self.reconstruction(x, recon)
        ssim_term = ms_ssim_loss(x, recon) if self.perceptual_weight > 0 else x.new_zeros(())
        kl = kl_loss(posterior)
        rec_total = rec + self.perceptual_weight * ssim_term
        loss = rec_total + self.kl_weight * kl
        logs = {"l1": rec.detach(), "ssim_loss": ssim_term.detach(), "kl": kl.detach()}
        if self.discriminator is not None and step >= self.gan_start:
            gan = -self.discriminator(recon).mean()
            weight = torch.tensor(self.gan_weight, device=x.device)
            if last_layer is not None and torch.is_grad_enabled():
                g_rec = torch.autograd.grad(rec_total, last_layer, retain_graph=True)[0]
                g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
                weight = self.gan_weight * (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(max=1e4).detach()
            loss = loss + weight * gan
            logs.update(gan=gan.detach(), gan_weight=weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def disc_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor | None, dict]:
        """Hinge loss of the discriminator on real x and detached recon; (None, {}) before gan_start or
        without a discriminator."""
        if self.discriminator is None or step < self.gan_start:
            return None, {}
        real, fake = self.discriminator(x), self.discriminator(recon.detach())
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return loss, {"disc_loss": loss.detach(), "logits_real": real.mean().detach(),
                      "logits_fake": fake.mean().detach()}
