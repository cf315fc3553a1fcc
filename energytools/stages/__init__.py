"""One function per pipeline stage; the CLI and the pipeline runner both call them."""
