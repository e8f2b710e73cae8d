import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import BertConfig, BertModel, BertTokenizerFast

from videodit import CausalVideoVAE, VideoDiT, VideoDiTPipeline

# The tests use tiny tensors: one thread avoids OpenMP spin-waiting, which on a loaded 2-core machine costs 10-100x.
torch.set_num_threads(1)

WORDS = "a two red green blue yellow purple white circle circles square squares triangle triangles moving left " \
        "right up down staying still small large on black gray background".split()


def tiny_text():
    """A tiny random BERT and a word-level tokenizer: the same transformers classes as MiniLM, built offline."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})  # (transformers 5 ignores vocab_file=)
    assert tok.convert_ids_to_tokens(tok("red circles")["input_ids"]) == ["[CLS]", "red", "circles", "[SEP]"]
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    return model.eval(), tok


def random_dit(**kw) -> VideoDiT:
    """A tiny denoiser (4 latent channels, text width 16) with random weights, not the zero-initialized ones, so that
    its outputs depend on its inputs and weights."""
    torch.manual_seed(0)
    dit = VideoDiT(**{**dict(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=16), **kw})
    for p in dit.parameters():
        p.data.normal_(0, 0.05)
    return dit.eval()


@pytest.fixture
def tiny_pipe():
    torch.manual_seed(0)
    vae = CausalVideoVAE(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, spatial_factor=4,
                         temporal_factor=4, mid_attention=False)
    dit = random_dit()
    text_encoder, tokenizer = tiny_text()
    return VideoDiTPipeline(vae.eval(), dit.eval(), text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(),
                            default_steps=3, default_guidance=3.0)
