"""Building blocks of the studio page: the model banner (`app.ui.banner`) and the tabs
(`app.ui.chat`, ...). Each module builds its components inside the caller's `gr.Blocks` context."""
