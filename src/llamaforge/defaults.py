"""Every default that more than one place needs, in one place: the library's function signatures,
the scripts' options and (checked by tests/test_config.py) the defaults of
schemas/config.schema.yaml. Nothing heavy is imported here, so `script --help` stays fast."""

# the merge and the Meta import
MAX_SHARD_SIZE = "5GB"  # decimal, as Hugging Face's save_pretrained counts
MERGE_DTYPE = "float16"
MERGE_DEVICE = "cpu"

# inference and evaluation (inference_hf.py's generation settings live in generate.ORIGINAL_GENERATION)
TEMPLATE = "auto"
BATCH_SIZE = 8
PERPLEXITY_STRIDE = 512
EQUIVALENCE_TOLERANCE = 1e-3

# the demo
DEMO_SEED = 42

# the crawl
CRAWL_CONCURRENCY = 8
CRAWL_ITEMS_PER_REQUEST = 20
CRAWL_SEED = 0
CRAWL_MAX_RETRIES = 5
CRAWL_TIMEOUT = 300.0
CRAWL_BACKOFF = 1.0
CRAWL_DEDUP_THRESHOLD = 0.7
CRAWL_PRICE = 0.0
