"""Media front ends: images, audio and video (plus live webcam clips) turned into the exact
model inputs of the Ming-flash-omni reference processor (spec §4.1, §4.2, §5.1, §5.4, §6.2)."""

from .audio import (
    AudioFeatures,
    AudioFrontendConfig,
    TimeConv,
    audio_token_count,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pack_audio_features,
    prepare_audio,
    resample,
    whisper_encoder_frames,
)
from .errors import MediaError
from .image import (
    FetchImageConfig,
    ImageInputs,
    ImageProcessorConfig,
    fetch_image,
    image_token_count,
    load_image,
    prepare_image,
    prepare_images,
    preprocess_images,
    resize_bicubic,
    smart_resize,
)
from .video import (
    VideoFrames,
    VideoInputs,
    VideoSamplingConfig,
    WebcamClip,
    fetch_video,
    prepare_video,
    preprocess_video,
    video_prompt_text,
)

__all__ = [
    "AudioFeatures", "AudioFrontendConfig", "TimeConv", "audio_token_count", "load_audio", "log_mel_spectrogram",
    "mel_filters", "pack_audio_features", "prepare_audio", "resample", "whisper_encoder_frames",
    "MediaError",
    "FetchImageConfig", "ImageInputs", "ImageProcessorConfig", "fetch_image", "image_token_count",
    "load_image", "prepare_image", "prepare_images", "preprocess_images", "resize_bicubic", "smart_resize",
    "VideoFrames", "VideoInputs", "VideoSamplingConfig", "WebcamClip", "fetch_video", "prepare_video",
    "preprocess_video", "video_prompt_text",
]
