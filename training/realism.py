"""Listing-photo realism transforms (price tags, watermarks, borders...).

Applied to positives and negatives alike so none of them becomes a shortcut. Placeholder module the
augmentation factory looks names up in first; transforms are added by the open-world issue.
"""
