"""Video over tapstack: HLS ladders and their checker."""
