"""Training losses of CPABMM, one per file; each returns an UNWEIGHTED value (the perceptual loss one
value per VGG layer). ``full_model.GeneratorFullModel`` applies ``train_params.loss_weights``."""
