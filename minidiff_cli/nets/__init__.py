"""The networks diffusion trains: the U-Net (time and condition embeddings, attention).

    unet.py  UNetConfig (checked bounds, activation estimate) and UNet

May import: errors only.
"""
