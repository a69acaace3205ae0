"""The MEC encoder: a residual MLP that produces the query used for code assignment."""

import math

import torch
from torch import nn


class ResidualEncoder(nn.Module):
    """q = x + std * MLP((x - mean) / std), with the MLP's output layer initialised to zero.

    At initialisation q == x, so training starts from plain PQ assignment in the original space
    and learns only a correction. The output lives in the original space, so codebook entries
    can serve both as assignment targets and (after the final refit) as reconstructions.

    Args:
        dim: D, row dimension.
        hidden_dim: width of the MLP's hidden layer.
        mean, std: data statistics [D] / scalar used to normalise the MLP input.
        generator: CPU generator for the first layer's initialisation.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        mean: torch.Tensor,
        std: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.std = float(std)
        bound = 1.0 / math.sqrt(dim)
        self.hidden = nn.Linear(dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, dim)
        with torch.no_grad():
            self.hidden.weight.copy_(
                torch.rand(hidden_dim, dim, generator=generator) * 2 * bound - bound
            )
            self.hidden.bias.copy_(torch.rand(hidden_dim, generator=generator) * 2 * bound - bound)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] -> q [B, D]."""
        z = (x - self.mean) / self.std
        return x + self.std * self.out(torch.relu(self.hidden(z)))
