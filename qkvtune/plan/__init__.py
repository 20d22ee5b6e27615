"""``qkvtune plan``: choose the matrices, λ, the learning rate and the stopping step from the pretrained NTK,
before training — and say when the configured budget will not learn.

1. The eNTK of every linear kind the model has (attention q, k, v, o; MLP gate, up, down), per slice, once, at the
   pretrained weights on n training and m validation points (``runs.pretrained``, ``analysis.ntk``; sketched for
   large n). For a classifier, its fresh head's linear layer is in the kernel too (kind ``head``, at the head's
   rate): the real run trains it. What the model's output is for the kernel (``kernel_examples``):
   * a sequence classifier: the head's margin (two classes) or logits; its loss cross-entropy (``mse`` for a
     regressor, transformers' loss);
   * a causal LM with ``--label-words``: the label words' logits where the answer is predicted;
   * a causal LM trained on its language-model loss (``task: sft``, ``text/…``): points are trained tokens drawn
     from the examples, each read as the margin u = z_y − log Σ_{k≠y} e^{z_k} of the observed token against the
     others, whose cross-entropy is exactly softplus(−u) (``ntk.token_margin``): a loss-gradient kernel on
     per-token margins, and the predicted validation loss is the mean of softplus(−u) over held-out tokens.
2. The method and the optimizer, from first principles. A method's kernel at its initialisation is a factor of
   the weights' (``Delta.kernel_factor``: LoRA's s²·r/(3·in), carried by B). Adam divides each parameter's step by
   its gradient's root mean square, so a block's kernel counts √(c·P/E‖ḡ‖²) times (``kernel_sim.adam_weight``),
   E‖ḡ‖² the minibatch gradient's squared norm read off the kernel itself; its first moment is an exponential
   average, simulated exactly in function space. (SGD: c, no average.)
3. The time scale: one short real run (``--calibration-steps`` of {q, v}, λ = 1, the head as configured, constant
   rate) is matched to the same simulation: s = how much further the real run moved its training outputs than the
   derivation says (s = 1: the derivation is the run). One s serves every candidate and rate.
4. Every candidate (targets × λ; η_V = λ·η_Q, every kind's rate by ``optim.lr_for_kind``) at every learning rate
   of the method's grid (``Delta.rate_grid`` or ``--lrs``) is the linearised model trained on the run's loss by
   the run's schedule (``kernel_sim.train_linearised``), read at every evaluation step. A candidate whose step
   passes the stability edge of its kernel (the top eigenvalue of the loss's curvature-weighted kernel against
   2/η for gradient descent, 2(1+β₁)/((1−β₁)η) for Adam's averaged steps) is predicted to fail: it scores as the
   constant predictor and is never recommended.
5. The budget: when no candidate reaches ``--goal`` (default: clearly beating the constant predictor) within the
   schedule, plan.md says so and the horizon is extended (steps ×2, ×4, … up to ``--max-budget``); where the
   kernel's own learning curve over n says examples are missing, it names how many.
6. ``plan.yaml``: the config with the best candidate's targets, λ, lr and stop (``max_steps``), and the extended
   budget where one was needed; ``plan.json`` every curve; ``plan.md`` the ranking, which of attention only, the
   MLP only and all-linear the kernel expects to win and by how much, with plots.

Selection reads the validation split: give the config ``val_size`` so the task's dev/test file stays unseen.

The package, by job: ``candidates`` (what is compared), ``readout`` (what the kernel reads, the kernels, each
candidate's rates), ``simulate`` (calibration, the simulated grid, budgets), ``planner`` (``plan``: all of it for one
config), ``report`` (plan.md, plan.json, plan.yaml), ``cli`` (``qkvtune plan``).
"""

from .candidates import REFERENCE, Candidate, candidates, parse_candidates, parse_numbers
from .cli import add_candidate_options, register
from .planner import plan
from .simulate import row_name

__all__ = ["plan", "register", "add_candidate_options", "Candidate", "candidates", "parse_candidates",
           "parse_numbers", "REFERENCE", "row_name"]
