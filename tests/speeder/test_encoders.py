import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speeder.encoders import (
    BackboneTextEncoder,
    EfficientNetLite0Encoder,
    HashingTextEncoder,
    HFTextEncoder,
    HFVisionEncoder,
    build_text_encoder,
    build_vision_encoder,
    decode_image,
    minilm_encoder,
    minilm_path,
    vision,
)

PARAPHRASES = ["A man is playing a guitar.", "Someone is strumming an acoustic guitar."]
UNRELATED = "The central bank raised interest rates again this quarter."


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gradient_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------- text


def test_hashing_encoder_is_deterministic_normalised_and_similarity_aware() -> None:
    enc = HashingTextEncoder(dim=128, seed=0)
    texts = ["Red running shoes for men", "red running shoes for women", "stainless steel kitchen knife", ""]
    a, b = enc(texts), HashingTextEncoder(dim=128, seed=0)(texts)
    assert a.shape == (4, 128) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a[:3], axis=1), 1.0, atol=1e-6)
    assert not a[3].any()  # empty text -> zero vector
    assert cosine(a[0], a[1]) > cosine(a[0], a[2]) + 0.3
    assert not np.array_equal(a[:3], HashingTextEncoder(dim=128, seed=1)(texts[:3]))


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return minilm_encoder()


def test_minilm_loads_offline_and_ranks_a_paraphrase_above_an_unrelated_sentence(minilm: HFTextEncoder) -> None:
    assert minilm.dim == 384 and minilm.name == "minilm"
    emb = minilm([*PARAPHRASES, UNRELATED])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.6 > 0.2 > emb[0] @ emb[2]
    # Sorting by length inside the call must not change which row is which, nor the values.
    alone = minilm([UNRELATED])
    assert np.allclose(alone[0], emb[2], atol=1e-5)
    assert minilm([]).shape == (0, 384)


@pytest.fixture(scope="module")
def tiny_llama() -> tuple[torch.nn.Module, object]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))  # any offline tokenizer will do
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_backbone_encoder_mean_pools_the_last_hidden_state(tiny_llama: tuple) -> None:
    model, tokenizer = tiny_llama
    texts = ["a short one", "a noticeably longer item description with many more words in it"]
    enc = BackboneTextEncoder(model, tokenizer, batch_size=2)
    out = enc(texts)
    assert enc.dim == 32 and out.shape == (2, 32) and out.dtype == np.float32
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(dim=1)[0]
    assert np.allclose(out[0], expected.numpy(), atol=1e-5)  # right padding leaves the short text intact
    assert np.allclose(BackboneTextEncoder(model.model, tokenizer)(texts), out, atol=1e-5)  # base model


def test_build_text_encoder_presets_paths_and_errors(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    assert isinstance(build_text_encoder("hashing"), HashingTextEncoder)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    local = build_text_encoder(str(tmp_path))
    assert isinstance(local, HFTextEncoder) and local.dim == 16 and local(["hello"]).shape == (1, 16)
    for bad in ("/no/such/encoder-folder", "./missing model!", "no-such-org/no-such-model-xyz"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            build_text_encoder(bad)


# ---------------------------------------------------------------- decode_image


@pytest.mark.parametrize("make", [
    lambda: encoded(gradient_image(), "PNG"),
    lambda: encoded(gradient_image((300, 120)), "JPEG"),
    lambda: encoded(gradient_image().convert("L"), "PNG"),
    lambda: encoded(gradient_image().convert("RGBA"), "PNG"),
    lambda: encoded(gradient_image().convert("P"), "GIF"),
    lambda: encoded(gradient_image().convert("CMYK"), "JPEG"),
    lambda: encoded(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"),  # 16-bit
], ids=["png", "jpeg-wide", "grey", "rgba", "palette-gif", "cmyk", "grey16"])
def test_decode_image_returns_rgb_of_the_requested_size(make) -> None:
    arr = decode_image(make(), 32)
    assert arr is not None and arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_decode_image_composites_transparency_on_white() -> None:
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    arr = decode_image(encoded(clear, "PNG"), 8)
    assert arr is not None and (arr == 255).all()


@pytest.mark.parametrize("data", [
    None,
    b"",
    b"this is a text file, not an image\n" * 10,
    bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    encoded(gradient_image((200, 200)), "PNG")[:400],  # truncated PNG
    encoded(gradient_image((200, 200)), "JPEG")[:300],  # truncated JPEG
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,  # a PNG signature and garbage
], ids=["none", "empty", "text", "random", "truncated-png", "truncated-jpeg", "corrupt-png"])
def test_decode_image_returns_none_for_bad_data(data: bytes | None) -> None:
    assert decode_image(data, 32) is None


def test_decode_image_refuses_decompression_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(gradient_image((64, 48)), "PNG")
    assert decode_image(data, 16) is not None
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    assert decode_image(data, 16) is None


# ---------------------------------------------------------------- image encoders


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder(batch_size=2)


def test_efficientnet_features_shape_mask_and_determinism(effnet: EfficientNetLite0Encoder) -> None:
    a = decode_image(encoded(gradient_image(seed=1), "PNG"), 224)
    b = np.ascontiguousarray(a[::-1, :, ::-1])  # flipped, channels swapped: a different picture
    images = [a, None, b, np.asarray(gradient_image((100, 80), seed=1))]  # the last is fitted to 224
    feats, mask = effnet(images)
    assert feats.shape == (4, 1280) and feats.dtype == np.float32
    assert mask.tolist() == [True, False, True, True]
    assert not feats[1].any() and np.abs(feats[0]).sum() > 0
    assert np.array_equal(effnet([a])[0][0], feats[0])  # deterministic, batch-independent
    assert cosine(feats[0], feats[2]) < 0.99
    with pytest.raises(ValueError, match="image 0"):
        effnet([np.zeros((8, 8), dtype=np.uint8)])
    empty, empty_mask = effnet([None, None])
    assert empty.shape == (2, 1280) and not empty.any() and not empty_mask.any()


def test_efficientnet_features_keep_imagenet_semantics(effnet: EfficientNetLite0Encoder) -> None:
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    feats, _ = effnet([decode_image(photo.read_bytes(), 224)])
    with torch.no_grad():  # pooled features -> the pretrained ImageNet head
        logits = effnet.model._fc(torch.from_numpy(feats))
    assert int(logits.argmax()) == 652  # "military uniform": the normalisation and pooling are right


def test_hf_vision_encoder_on_a_tiny_random_vit(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
    ViTModel(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = build_vision_encoder(str(tmp_path))
    assert isinstance(enc, HFVisionEncoder) and enc.dim == 16
    a = np.asarray(gradient_image(seed=2))
    feats, mask = enc([a, None, a[::-1].copy()])
    assert feats.shape == (3, 16) and mask.tolist() == [True, False, True]
    assert not feats[1].any() and not np.allclose(feats[0], feats[2])
    assert np.allclose(enc([a])[0][0], feats[0], atol=1e-6)


def test_hf_vision_encoder_uses_blip2_qformer_features(tmp_path: Path) -> None:
    from transformers import Blip2Config, Blip2Model, BlipImageProcessor

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            encoder_hidden_size=16, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, vocab_size=100, word_embed_proj_dim=16),
        num_query_tokens=4,
    )
    model = Blip2Model(config).eval()
    model.save_pretrained(tmp_path)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = HFVisionEncoder(tmp_path)
    assert enc.dim == 24 and enc.model.language_model is None  # Q-Former width, LLM dropped
    a = np.asarray(gradient_image(seed=3))
    feats, mask = enc([a, None])
    pixels = enc.processor(images=[a], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_qformer_features(pixel_values=pixels)
    expected = expected if isinstance(expected, torch.Tensor) else expected.last_hidden_state
    assert np.allclose(feats[0], expected.mean(dim=1)[0].numpy(), atol=1e-5)
    assert mask.tolist() == [True, False]


def test_build_vision_encoder_none_and_errors() -> None:
    assert build_vision_encoder("none") is None
    for bad in ("/no/such/vision-folder", "no-such-org/no-such-vision-model-xyz"):
        with pytest.raises(ValueError, match=bad):
            build_vision_encoder(bad)
