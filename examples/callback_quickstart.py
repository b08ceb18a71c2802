"""Add one callback to your Trainer: the README snippet, runnable as is (CPU, a few seconds)."""

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import LoRAFinetuning, MergeAndExport, TrainableParameters


class CausalLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = None

    def configure_model(self):  # or build it in __init__: the surgery runs after either
        if self.model is None:
            config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
            torch.manual_seed(0)  # a stand-in for from_pretrained: the same base weights on every build
            self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        # Runs after the LoRA surgery: give it the trainable parameters.
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-3)


data = DataLoader(torch.randint(0, 128, (32, 16)), batch_size=8)
lora = LoRAFinetuning(LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]), module="model")
trainer = L.Trainer(accelerator="cpu", max_steps=20,
                    callbacks=[lora, TrainableParameters(), MergeAndExport("out/export")])
trainer.fit(CausalLM(), data)  # out/export/adapter (PEFT format), out/export/merged (save_pretrained)

# Resume exactly, with a freshly built module, from the small checkpoint:
ckpt = trainer.checkpoint_callback.best_model_path
more = L.Trainer(accelerator="cpu", max_steps=40, callbacks=[LoRAFinetuning.from_checkpoint(ckpt)])
more.fit(CausalLM(), data, ckpt_path=ckpt)

# Outside a Trainer: `CausalLM.load_from_checkpoint` builds a module without adapters and cannot load an
# adapter-only checkpoint. Apply the same surgery to a new module and load:
module = LoRAFinetuning.from_checkpoint(ckpt).load_checkpoint(CausalLM(), ckpt)
