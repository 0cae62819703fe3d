from embed_cache.cli import main

main()
