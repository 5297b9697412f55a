"""Runs inside the throwaway virtual environment that holds `mathematics-dataset` (it needs old sympy and numpy pins),
never in mode-edge's own environment. Prints one JSON object per problem: module, question, answer.

Usage: python mathgen_script.py PER_MODULE SEED
"""

import json
import random
import sys

import numpy as np
from absl import flags
from mathematics_dataset import generate

per_module, seed = int(sys.argv[1]), int(sys.argv[2])
flags.FLAGS(["mathgen"])  # the generator's module table reads its (default) absl flags
random.seed(seed)
np.random.seed(seed)
generate.init_modules(train_split=False)
for name, module in generate.filtered_modules["train"].items():
    for _ in range(per_module):
        problem, _ = generate.sample_from_module(module)
        print(json.dumps({"module": name, "question": str(problem.question), "answer": str(problem.answer)}))
