"""Names of the canonical dataset layout (docs/data.md#layout), defined once.

The platform reads and writes these files; the model only sees the arrays they hold.
"""

# items.parquet
ITEM_ID = "item_id"
SOURCE_ID = "source_id"
TITLE = "title"
TEXT = "text"
IMAGE_URI = "image_uri"

# interactions.parquet
USER_ID = "user_id"
TIMESTAMP = "timestamp"
RATING = "rating"

# splits/{train,valid,test}.parquet
HISTORY = "history"
TARGET = "target"
CANDIDATES = "candidates"

# features/<set>/items.parquet
TEXT_EMB = "text_emb"
IMAGE_EMB = "image_emb"
SEQ_EMB = "seq_emb"

SPLITS = ("train", "valid", "test")
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
SPLITS_DIR = "splits"
IMAGES_DIR = "images"
FEATURES_DIR = "features"
META_FILE = "meta.json"

MODALITIES = ("text", "vision", "sequence")
