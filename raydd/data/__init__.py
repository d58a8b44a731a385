"""Reading and writing data: COCO splits, image decoding, the embedded demo dataset."""
