from training.conftest import cache_dir, text_file  # noqa: F401 - shared session fixtures
