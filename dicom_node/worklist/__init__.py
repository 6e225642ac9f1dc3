"""Order awareness: the Modality Worklist (RIS orders) and how studies are matched to them."""
