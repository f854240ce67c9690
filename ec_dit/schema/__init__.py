"""The config schema: every key, its default, the allowed values, and validation.

The bottom of the package: nothing here imports another `ec_dit` module.

    from ec_dit import schema
    config = schema.base_config()          # every key a config file may set
    schema.validate(config)                # ValueError naming the first bad field
"""

from ec_dit.schema.defaults import (ACTIVATIONS, CAPTION_TASKS, CONDITIONINGS, DDPM_SAMPLERS, DDPM_TIMESTEPS,
                                    DEFAULT_RULES, DISPATCHES, DROPLESS_IMPLS, DTYPES, POSITIONS,
                                    FFN_KINDS, GENEVAL_DOMAINS, MESH_AXES, MIN_IMAGE_SIZE, OPTIMIZERS, PREDICTIONS,
                                    PREPARE_README, REMAT_POLICIES, SAMPLERS, SOURCE_FORMS, SOURCE_KINDS, TASKS,
                                    TEXT_ENCODERS, TOKENIZERS, VARIANTS, apply_variant, base_config,
                                    input_defaults, mesh_defaults, model_defaults, paper_config, paper_model)
from ec_dit.schema.pixart import PIXART_RESOLUTIONS, pixart_alpha_config
from ec_dit.schema.class_cond import (CLASS_OBJECTIVES, CLASS_SAMPLERS, class_cond_model_defaults,
                                     class_diffusion_defaults, validate_class_cond, validate_dit_moe_network)
from ec_dit.schema.heldout import heldout_defaults, validate_heldout
from ec_dit.schema.resume import (RESUME_SAFE_FIELDS, RESUME_STATE_FIELDS, config_differences, flatten,
                                  is_safe_field, is_state_field, split_differences)
from ec_dit.schema.checks import fail, is_int
from ec_dit.schema.validation import (as_axes, check_paths, missing_paths, parse_source, validate, validate_input,
                                      validate_mesh, validate_model, validate_training, with_input_defaults)
