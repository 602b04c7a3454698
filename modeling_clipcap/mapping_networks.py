"""The paper's two mapping networks: an image embedding (B, D) -> a prefix of K language-model embeddings (B, K, E).

``ClipCapMLPMapper`` (one hidden layer) and ``ClipCapTransformerMapper`` (a small pre-LN transformer over
projected image vectors and a learned constant); ``MAPPING_NETWORKS`` maps ``config.mapping_type`` to them.
Their parameter names are those of the saved checkpoints: keep them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_clipcap import ClipCapConfig


class ClipCapMLPMapper(nn.Module):
    """The paper's MLP mapper: Linear(D, E*K/2) -> Tanh -> Linear(E*K/2, E*K), reshaped: (B, D) -> (B, K, E)."""

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        self.prefix_length = config.prefix_length
        self.hidden_size = config.hidden_size
        out_features = self.hidden_size * self.prefix_length
        hidden = config.mapping_hidden_size or out_features // 2
        self.layers = nn.Sequential(
            nn.Linear(config.image_embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_features)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, K, E)."""
        return self.layers(image_embeds).view(image_embeds.shape[0], self.prefix_length, self.hidden_size)


class ClipCapMapperAttention(nn.Module):
    """Unmasked multi-head self-attention of the transformer mapper, (B, N, E) -> (B, N, E): bias-free query and
    key/value projections (keys then values in one (2E, E) matrix, the original ``to_keys_values``)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.kv_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, e = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(hidden_states).split(e, dim=-1)
        k = k.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim), scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, e))


class ClipCapMapperMLP(nn.Module):
    """Feed-forward block of the transformer mapper: Linear(E, r*E) -> ReLU -> Linear(r*E, E)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(hidden_states)))


class ClipCapMapperLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, N, E) -> (B, N, E)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = ClipCapMapperAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = ClipCapMapperMLP(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ClipCapTransformerMapper(nn.Module):
    """The paper's transformer mapper: ``image_embeds`` (B, D) -> Linear -> (B, clip_length, E), followed by a
    learned constant (K, E) -> ``mapping_num_layers`` pre-LN layers -> the constant's K positions (B, K, E).
    With ``mapping_input="tokens"`` the tower's features (B, N, D) -> Linear(D, E) -> (B, N, E) come first instead,
    plus a learned position embedding (N, E) when ``config.mapping_num_tokens`` is set (``token_positions``).
    """

    def __init__(self, config: ClipCapConfig):
        super().__init__()
        e = config.hidden_size
        self.tokens = config.mapping_input == "tokens"
        self.clip_length = config.clip_length
        self.hidden_size = e
        self.linear = nn.Linear(config.image_embed_dim, e if self.tokens else config.clip_length * e)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, e))
        num_tokens = getattr(config, "mapping_num_tokens", None) if self.tokens else None
        self.token_positions = nn.Parameter(torch.zeros(num_tokens, e)) if num_tokens else None
        self.layers = nn.ModuleList(
            ClipCapMapperLayer(e, config.mapping_num_heads, config.mapping_mlp_ratio)
            for _ in range(config.mapping_num_layers)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D), or (B, N, D) token features -> (B, K, E)."""
        b = image_embeds.shape[0]
        clip_tokens = self.linear(image_embeds)  # (B, N, E) for tokens
        if not self.tokens:
            clip_tokens = clip_tokens.view(b, self.clip_length, self.hidden_size)
        elif self.token_positions is not None:
            if clip_tokens.shape[1] != self.token_positions.shape[0]:
                raise ValueError(
                    f"the mapper has position embeddings for mapping_num_tokens={self.token_positions.shape[0]} "
                    f"tokens, but got {clip_tokens.shape[1]} token features (B, N, D) = {tuple(image_embeds.shape)}: "
                    "set mapping_num_tokens to the tower's number of tokens."
                )
            clip_tokens = clip_tokens + self.token_positions.to(clip_tokens.dtype)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(clip_tokens.dtype)
        hidden_states = torch.cat([clip_tokens, const], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states[:, clip_tokens.shape[1] :]


MAPPING_NETWORKS: dict[str, type[nn.Module]] = {
    "mlp": ClipCapMLPMapper,
    "transformer": ClipCapTransformerMapper,
}


__all__ = [
    "MAPPING_NETWORKS",
    "ClipCapMLPMapper",
    "ClipCapMapperAttention",
    "ClipCapMapperLayer",
    "ClipCapMapperMLP",
    "ClipCapTransformerMapper",
]
