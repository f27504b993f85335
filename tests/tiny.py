"""A tiny tokenizer (and, later, model) built in-process, so tests need no downloads."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "<SMILES> CCO </SMILES> <IUPAC> ethanol </IUPAC> <MOLFORMULA> C2H6O </MOLFORMULA>",
    "<NUMBER> -0.31 </NUMBER> <BOOLEAN> Yes </BOOLEAN> <BOOLEAN> No </BOOLEAN>",
    "What is the molecular formula of the compound? Translate the SMILES into its IUPAC name.",
    "user assistant system You are a chemistry assistant. c1ccccc1 Cl Br N O S P F ( ) = # [ ] @ + - 0123456789",
]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a few hundred tokens and a ChatML chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
