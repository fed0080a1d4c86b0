"""How many graphs and graph breaks ``torch._dynamo.explain`` finds in one regularized training
step of the library's MLP (the Lyapunov penalty at ``fraction=0.125``), and why each break.

    python benchmarks/graph_breaks.py                 # 784-256x4-10, T=25, B=64, as lyapunov_overhead.py
    python benchmarks/graph_breaks.py --T 5 --B 8     # smaller, same breaks, faster

The count is on record, not a target: the neuron hooks run eagerly by design (an opaque call
under torch.compile), and custom autograd functions with a forward-mode formula are not traced.
"""
from __future__ import annotations

import argparse
import collections
import warnings

import torch
import torch.nn.functional as F

from stablespike import LyapunovRegularizer, SpikingMLP

warnings.filterwarnings("ignore", message="eps=", category=RuntimeWarning)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=25)
    p.add_argument("--B", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    model = SpikingMLP(784, [256] * 4, 10)
    x, y = torch.rand(args.B, args.T, 784), torch.randint(0, 10, (args.B,))
    reg = LyapunovRegularizer()

    def step(x, y):
        logits, lam, _ = model(x, compute_lyapunov=True, lyap_fraction=0.125)
        loss = F.cross_entropy(logits, y) + reg(lam)
        loss.backward()
        return loss.detach()

    import torch._dynamo as dynamo  # imported here: 1 s, only this script needs it
    explanation = dynamo.explain(step)(x, y)
    print(f"torch {torch.__version__}: {explanation.graph_count} graphs, "
          f"{explanation.graph_break_count} graph breaks in one regularized MLP training step "
          f"(784-256x4-10, T={args.T}, B={args.B}, fraction=0.125)")
    reasons = collections.Counter(b.reason.splitlines()[0][:110] for b in explanation.break_reasons)
    print(f"the {len(explanation.break_reasons)} reasons dynamo lists, by kind:")
    for reason, count in reasons.most_common():
        print(f"{count:4d}  {reason}")


if __name__ == "__main__":
    main()
