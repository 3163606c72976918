"""A small byte-level BPE tokenizer for the preset models, trained on embedded text.

Byte-level means the 256 byte symbols are all in the vocabulary, so any UTF-8
string encodes and decodes back exactly (non-ASCII text just costs more tokens).
The merges come from the short English text below, so English gets somewhat
shorter token sequences. Training takes well under a second and is
deterministic, so a preset directory is reproducible from its seed alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, "<|start_header_id|>", "<|end_header_id|>"]  # ids 0..4

# Llama 3 style: BOS, then each message framed by header tokens and ended by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TRAINING_TEXT = """\
The river ran slowly past the old mill, and the children watched the water turn the wheel.
In the morning the baker opened his shop, and the smell of fresh bread filled the street.
A small dog followed the postman from house to house, waiting for a kind word or a biscuit.
When the rain came, the farmers were glad, because the fields had been dry for many weeks.
She asked the teacher why the sky is blue, and the teacher said it is because of the light.
The train to the city leaves at seven o'clock, and it stops at every station on the way.
He wrote a long letter to his brother, telling him about the new house and the garden.
The market was busy on Saturday: people bought apples, cheese, fish, flowers and honey.
At night the town was quiet, and the only sound was the wind in the trees by the church.
Computers read numbers, and a language model reads text as a sequence of numbers too.
Each word is split into pieces called tokens, and the model predicts the next token.
The model is small, so what it writes is nonsense, but every part of the system still runs.
Questions and answers: What is your name? Where do you live? How old are you? Why not?
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
One, two, three, four, five, six, seven, eight, nine, ten; 1 2 3 4 5 6 7 8 9 10 100 1000.
It was the best of days and the worst of days; the weather changed every hour or so.
They walked along the beach, collecting shells and stones, until the sun went down.
Good morning! Thank you very much. You are welcome. See you tomorrow. Have a nice day.
The library has thousands of books about history, science, music, art and the sea.
If you want to learn something well, you should practise it a little every day.
The engineer measured the time of each step, because a guess is not a measurement.
Memory is cheap and plentiful; compute is fast but scarce; the network sits between them.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the preset tokenizer with at most `vocab_size` tokens (specials included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    # transformers adds special tokens through the post-processor; this makes its
    # `encode(text)` equal to lamina's `encode(text, add_bos=True)`.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def write_tokenizer(out_dir: Path, vocab_size: int) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json (with the chat template)."""
    tok = build_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tok
