"""QAT with the Trainer under DDP on CPU (gloo): run by tests/test_distributed.py via
``torchrun --nproc_per_node 2 tests/scripts/qat_ddp.py OUT_DIR``.

In one launch (two processes start once: they import torch and transformers, the slow part), every rank trains
the same tiny Llama with ``PoTQATCallback``:

1. ``straight``: 4 steps; rank 0 writes the packed checkpoint (``OUT_DIR/final``);
2. ``interrupted``: 2 steps, saving ``OUT_DIR/run/checkpoint-2`` (float weights, learned scales, optimizer, RNG);
3. ``resumed``: a fresh float model resumes that checkpoint to step 4.

Each rank writes ``OUT_DIR/{straight,resumed}{rank}.pt``: every tensor of the trained model's state dict.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from conftest import make_tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from optimum_pot import PoTConfig, PoTQATCallback  # noqa: E402

CONFIG = PoTConfig(bits=3, group_size=32)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq_len=16):
        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def trainer(model, out: str, steps: int, convert_at_end: bool = True) -> Trainer:
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True, ddp_backend="gloo", seed=0,
        lr_scheduler_type="constant",
    )  # fmt: skip
    callback = PoTQATCallback(CONFIG, convert_at_end=convert_at_end)
    t = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback])
    assert t.args.world_size == 2, f"expected 2 processes, got world_size={t.args.world_size}"
    return t


def main(out: str) -> None:
    straight = make_tiny_llama()
    t = trainer(straight, os.path.join(out, "straight"), 4)
    t.train()
    rank = t.args.process_index
    torch.save(straight.state_dict(), os.path.join(out, f"straight{rank}.pt"))
    t.save_model(os.path.join(out, "final"))  # the main process writes

    trainer(make_tiny_llama(), os.path.join(out, "run"), 2, convert_at_end=False).train()
    resumed = make_tiny_llama()  # a fresh float model, as after a crash
    trainer(resumed, os.path.join(out, "run"), 4).train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
    torch.save(resumed.state_dict(), os.path.join(out, f"resumed{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
