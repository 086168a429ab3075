import torch

# The test models are tiny: one thread avoids OpenMP hand-off costs that dominate them on small machines.
torch.set_num_threads(1)

import strategies  # noqa: E402,F401  (registers and loads the suite's hypothesis profile)
