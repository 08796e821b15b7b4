"""SASRec (Kang & McAuley, ICDM 2018) as RecBole 1.2.1 implements it: the sequence baseline and the
source of every item's sequence features (`seq_emb`, docs/model.md#item-features).

Faithful to RecBole's `sasrec.py` + `layers.py` + `SASRec.yaml`/`overall.yaml` defaults: learned
absolute position embeddings, LayerNorm + dropout on the input, post-LN Transformer layers (attention
-> dropout -> LayerNorm(x + .), FFN dense-gelu(erf)-dense -> dropout -> LayerNorm(x + .)), additive
-10000 attention mask, N(0, 0.02) init, CE over all items with the item table tied to the output,
hidden 64, 2 layers, 2 heads, inner 256, dropout 0.5 (hidden and attention), eps 1e-12, max length 50,
Adam lr 1e-3, batch 2048, every prefix of a user's train sequence is one training sample.

Input convention (the one deliberate difference in layout): item ids are 0..N-1 externally and a
sequence batch is **right-aligned and left-padded with PAD = -1**, so the most recent item is always in
the last column and no lengths are needed. Internally ids are shifted by +1 so row 0 of the embedding
table is padding. Positions are counted from the oldest item in the window (RecBole's order: the
oldest of at most `max_length` items is position 0), so extra left padding never changes a result.
The padding row is excluded from the logits (RecBole scores it and masks it at evaluation only).

Training and evaluation:
    model, stats = train_sasrec(train_sequences, num_items, epochs=8)
    metrics = evaluate_full_ranking(model, test_histories, test_targets, k=10)
"""

from speeder.sasrec.model import PAD, SASRec, SASRecLayer, fast_dropout, pad_sequences
from speeder.sasrec.train import build_training_samples, build_window_samples, evaluate_full_ranking, train_sasrec

__all__ = ["PAD", "SASRec", "SASRecLayer", "build_training_samples", "build_window_samples", "evaluate_full_ranking",
           "fast_dropout", "pad_sequences", "train_sasrec"]
