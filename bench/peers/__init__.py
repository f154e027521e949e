"""The peers storno is compared with, each written the way its own documentation recommends."""
