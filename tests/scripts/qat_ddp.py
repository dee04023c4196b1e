"""QAT with the Trainer under DDP on CPU (gloo): run by tests/test_distributed.py via
``torchrun --nproc_per_node 2 tests/scripts/qat_ddp.py OUT_DIR``.

Every rank trains the same tiny Llama with ``PoTQATCallback`` for a few steps, writes a digest of its packed state
(``OUT_DIR/rank{r}.pt``) and rank 0 writes the packed checkpoint (``OUT_DIR/final``).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from conftest import make_tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from optimum_pot import PoTConfig, PoTLinear, PoTQATCallback  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq_len=16):
        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def main(out: str) -> None:
    model = make_tiny_llama()
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, ddp_backend="gloo", seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(),
        callbacks=[PoTQATCallback(PoTConfig(bits=3, group_size=32))],
    )
    assert trainer.args.world_size == 2, f"expected 2 processes, got world_size={trainer.args.world_size}"
    trainer.train()
    packed = {
        n: (m.weight.clone(), m.weight_scale.clone()) for n, m in model.named_modules() if isinstance(m, PoTLinear)
    }
    torch.save(packed, os.path.join(out, f"rank{trainer.args.process_index}.pt"))
    trainer.save_model(os.path.join(out, "final"))  # the main process writes


if __name__ == "__main__":
    main(sys.argv[1])
