"""The PyTorch eager reference for `make bench`: the same GPT, written as a PyTorch user would
(nanoGPT style: F.layer_norm, F.scaled_dot_product_attention, tanh GELU, fused cross-entropy,
torch.optim.AdamW), started from our initial parameters so both see the same numbers.

Benchmark-only: nothing in training or tests imports torch.
"""

import torch
import torch.nn.functional as F


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg, params: dict):
        """cfg: models.gpt.GPTConfig; params: our name -> NumPy array (float32)."""
        super().__init__()
        self.cfg = cfg
        self.names = list(params)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.tensor(params[name])) for name in self.names)
        self.by_name = dict(zip(self.names, self.weights))

    def forward(self, idx, targets):
        p, cfg = self.by_name, self.cfg
        B, T = idx.shape
        C, H = cfg.n_embd, cfg.n_head
        x = p["wte"][idx] + p["wpe"][:T]
        for i in range(cfg.n_layer):
            pre = f"h.{i}."
            h = F.layer_norm(x, (C,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], 1e-5)
            qkv = torch.addmm(p[pre + "attn.c_attn.bias"], h.view(B * T, C),
                              p[pre + "attn.c_attn.weight"]).view(B, T, 3, H, C // H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B * T, C)
            x = x + torch.addmm(p[pre + "attn.c_proj.bias"], y,
                                p[pre + "attn.c_proj.weight"]).view(B, T, C)
            h = F.layer_norm(x, (C,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], 1e-5)
            h = torch.addmm(p[pre + "mlp.c_fc.bias"], h.view(B * T, C), p[pre + "mlp.c_fc.weight"])
            h = F.gelu(h, approximate="tanh")
            x = x + torch.addmm(p[pre + "mlp.c_proj.bias"], h,
                                p[pre + "mlp.c_proj.weight"]).view(B, T, C)
        x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], 1e-5)
        logits = x.view(B * T, C) @ p["wte"].t()
        return F.cross_entropy(logits, targets.view(-1))


def make_optimizer(model, is_decayed, lr, betas, weight_decay):
    decay = [w for n, w in model.by_name.items() if is_decayed(n)]
    rest = [w for n, w in model.by_name.items() if not is_decayed(n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas)


def train_step(model, optimizer, idx, targets, grad_clip, bf16=False):
    """One full step, as our trainer does it: forward, backward, clip, AdamW; `bf16`:
    the forward under torch's CPU autocast to bfloat16 (its mixed precision)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(idx, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


