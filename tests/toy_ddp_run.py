"""Run by tests/test_engine_contract.py under `accelerate launch` (2 processes): the toy two-optimizer method with
a frozen teacher; each rank writes the gradients each optimizer applied and its local losses."""

import json
import os
import sys

from evcli import api
from evcli.testing.toy import ToyGAN

out = sys.argv[1]
# val set "b" holds 1 sample: rank 1 sees no batch of it and must still take part in the summed evaluation
recipe = api.resolve(
    "toy-gan", flags={"out.dir": out, "schedule.max_steps": 4, "train.log_every": 1, "toy-gan.val_b_samples": 1}
)
method = ToyGAN(recipe)
api.train(recipe, method=method)
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"grads": method.grad_log, "losses": method.local_losses}, fh)
