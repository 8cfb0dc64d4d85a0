"""The command line's flags, defined by topic so `--help` prints them in groups, basics first.

Every flag of google-research/simclr `tf2/run.py` keeps its name, meaning and default (an original
command line works unchanged); the others are tf-simclr's. `GROUPS` is the one list of which flag
belongs to which topic (a test checks each defined flag is in exactly one group).
"""

from absl import flags

# The flags' choice lists are config.py's (a light module: no TensorFlow, so --help stays fast).
from tf_simclr import config as cfg

# (name, title, flag names) in the order --help prints them.
GROUPS = (
    ('basic', 'What to run, on which data, where', (
        'mode', 'train_mode', 'dataset', 'model_dir', 'data_dir', 'checkpoint', 'train_split',
        'eval_split', 'image_size', 'train_batch_size', 'train_epochs', 'train_steps',
        'learning_rate', 'seed')),
    ('data', 'Augmentation, caching, labels and bad files', (
        'cache_dataset', 'color_jitter_strength', 'color_jitter_impl', 'use_blur',
        'train_label_fraction', 'label_fraction_seed', 'skip_bad_images', 'skip_empty_classes')),
    ('model', 'Encoder, heads and precision', (
        'resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'proj_head_mode',
        'proj_out_dim', 'num_proj_layers', 'ft_proj_selector', 'batch_norm_decay', 'global_bn',
        'precision', 'jit_compile')),
    ('training', 'Objective, optimizer, schedule, checkpoints', (
        'optimizer', 'learning_rate_scaling', 'warmup_epochs', 'weight_decay', 'momentum',
        'temperature', 'hidden_norm', 'lineareval_while_pretraining', 'fine_tune_after_block',
        'frozen_batch_norm',
        'logits_layer_init', 'zero_init_logits_layer', 'checkpoint_epochs', 'checkpoint_steps',
        'steps_per_loop', 'keep_checkpoint_max', 'allow_flag_changes', 'lock_lease_s',
        'train_summary_steps', 'variable_schema')),
    ('evaluation', 'Eval, kNN monitor, linear probe, embeddings', (
        'eval_steps', 'eval_batch_size', 'eval_name', 'eval_timeout', 'knn_monitor', 'knn_k',
        'knn_temperature', 'knn_every_epochs', 'knn_max_bank_size', 'linear_probe',
        'random_init_baseline', 'embed_split', 'embed_endpoint', 'query', 'num_neighbors',
        'threshold', 'num_preview_images', 'num_preview_pairs')),
    ('export', 'SavedModel exports', (
        'keep_hub_module_max',)),
    ('distributed', 'Devices and strategies', (
        'distribution_strategy', 'cpu_devices')),
    ('tpu', 'Cloud TPUs', (
        'use_tpu', 'tpu_name', 'tpu_zone', 'gcp_project', 'master', 'allow_local_paths_on_tpu')),
    ('distillation', 'Teacher and student', (
        'teacher_checkpoint', 'distill_temperature', 'distill_loss_scale', 'distill_label_weight',
        'teacher_resnet_depth', 'teacher_width_multiplier', 'teacher_sk_ratio', 'teacher_se_ratio',
        'teacher_proj_head_mode', 'teacher_precision', 'teacher_num_proj_layers',
        'teacher_proj_out_dim', 'teacher_ft_proj_selector')),
)

# ---- basic: What to run, on which data, where. ----
flags.DEFINE_enum('mode', 'train', list(cfg.MODES),
                  'train, eval (follows new checkpoints in model_dir until the last step), '
                  'train_then_eval, export (SavedModel of the latest checkpoint, else of '
                  '--checkpoint), probe (kNN and linear probe on frozen features of --checkpoint, '
                  'else of the newest checkpoint in model_dir, else of the random-init encoder), '
                  'embed (features of every image of --embed_split to '
                  'model_dir/embeddings/<split>/, with TensorBoard projector files), neighbors '
                  '(nearest images to --query), duplicates (groups of near-duplicate images) or '
                  'preview_augment (model_dir/augment_preview.png: pretraining views). All but '
                  'train and train_then_eval read the architecture and data flags not given from '
                  'the run\'s flags.json.')
flags.DEFINE_enum('train_mode', 'pretrain', list(cfg.TRAIN_MODES),
                  'The objective and trainable components: pretrain (contrastive), finetune '
                  '(supervised), distill (student learns a teacher).')
flags.DEFINE_string('dataset', 'imagenet2012',
                    'A TFDS image classification dataset name, folder:PATH for '
                    'PATH/<split>/<class>/*.{jpg,png}, or the built-in shapes10 (no download).')
flags.DEFINE_string('model_dir', None, 'Model directory for training.')
flags.DEFINE_string('data_dir', None, 'Directory where dataset is stored.')
flags.DEFINE_string('checkpoint', None,
                    'Initialise from this checkpoint (ours, a SavedModel export, or weights '
                    'written by google-research/simclr) if model_dir has no checkpoint yet.')
flags.DEFINE_string('train_split', 'train',
                    'Split for training; TFDS slicing such as train[:10%] works.')
flags.DEFINE_string('eval_split', 'validation', 'Split for evaluation.')
flags.DEFINE_integer('image_size', 224, 'Input image size.')
flags.DEFINE_integer('train_batch_size', 512, 'Batch size for training.')
flags.DEFINE_integer('train_epochs', 100, 'Number of epochs to train for.')
flags.DEFINE_integer('train_steps', 0,
                     'Number of steps to train for. If provided, overrides train_epochs.')
flags.DEFINE_float('learning_rate', 0.3, 'Initial learning rate per batch size of 256.')
flags.DEFINE_integer('seed', None, 'Global random seed (None: nondeterministic).')

# ---- data: Augmentation, caching, labels and bad files. ----
flags.DEFINE_bool('cache_dataset', False,
                  'Whether to cache the entire dataset in memory (good for small datasets).')
flags.DEFINE_float('color_jitter_strength', 1.0, 'The strength of color jittering.')
flags.DEFINE_enum('color_jitter_impl', 'simclrv2', list(cfg.COLOR_JITTER_IMPLS),
                  'Brightness jitter: simclrv1 additive, simclrv2 multiplicative.')
flags.DEFINE_boolean('use_blur', True,
                     'Whether or not to use Gaussian blur for augmentation during pretraining.')
flags.DEFINE_float('train_label_fraction', 1.0,
                   'Keep a class-balanced, seeded fraction of the train split as labelled data '
                   '(ids written to model_dir/label_subset.json).')
flags.DEFINE_integer('label_fraction_seed', 0, 'Seed for --train_label_fraction.')
flags.DEFINE_bool('skip_bad_images', False,
                  'folder: datasets: decode every image once before training and leave out (and '
                  'count in the log) those that cannot be decoded. Without it, a bad image stops '
                  'the run with an error naming the file.')
flags.DEFINE_bool('skip_empty_classes', False,
                  'folder: datasets: leave out class folders that hold no images (logged). '
                  'Without it, such a folder is an error naming it.')

# ---- model: Encoder, heads and precision. ----
flags.DEFINE_integer('resnet_depth', 50, 'Depth of ResNet.')
flags.DEFINE_float('width_multiplier', 1,
                   'Multiplier to change width of network (the papers use 1-4; fractions such as '
                   '0.25 give small models for CPUs).')
flags.DEFINE_float('sk_ratio', 0., 'If it is bigger than 0, it will enable SK. '
                   'Recommendation: 0.0625.')
flags.DEFINE_float('se_ratio', 0., 'If it is bigger than 0, it will enable SE.')
flags.DEFINE_enum('proj_head_mode', 'nonlinear', list(cfg.PROJ_HEAD_MODES),
                  'How the head projection is done.')
flags.DEFINE_integer('proj_out_dim', 128, 'Number of head projection dimension.')
flags.DEFINE_integer('num_proj_layers', 3, 'Number of non-linear head layers.')
flags.DEFINE_integer('ft_proj_selector', 0,
                     'Which layer of the projection head to use during fine-tuning. 0 means no '
                     'projection head, and -1 means the final layer.')
flags.DEFINE_float('batch_norm_decay', 0.9, 'Batch norm decay parameter.')
flags.DEFINE_boolean('global_bn', True,
                     'Whether to aggregate BN statistics across distributed cores.')
flags.DEFINE_enum('precision', 'float32', list(cfg.PRECISIONS),
                  'Compute precision (Keras dtype policy; variables stay float32): mixed_bfloat16 '
                  'for TPUs and CPUs with bfloat16 units, mixed_float16 (dynamic loss scaling) '
                  'for GPUs.')
flags.DEFINE_bool('jit_compile', False,
                  'XLA-compile the train and eval steps (TPUs always use XLA; slower on CPU).')

# ---- training: Objective, optimizer, schedule, checkpoints. ----
flags.DEFINE_enum('optimizer', 'lars', list(cfg.OPTIMIZERS), 'Optimizer to use.')
flags.DEFINE_enum('learning_rate_scaling', 'linear', list(cfg.LR_SCALINGS),
                  'How to scale the learning rate as a function of batch size.')
flags.DEFINE_float('warmup_epochs', 10, 'Number of epochs of warmup.')
flags.DEFINE_float('weight_decay', 1e-6, 'Amount of weight decay to use.')
flags.DEFINE_float('momentum', 0.9, 'Momentum parameter.')
flags.DEFINE_float('temperature', 0.1, 'Temperature parameter for contrastive loss.')
flags.DEFINE_boolean('hidden_norm', True,
                     'Whether to L2-normalise the hidden vectors in the contrastive loss.')
flags.DEFINE_bool('lineareval_while_pretraining', True,
                  'Whether to finetune supervised head while pretraining.')
flags.DEFINE_integer('fine_tune_after_block', -1,
                     'The layers after which block that we will fine-tune. -1 means fine-tuning '
                     'everything. 0 means fine-tuning after stem block. 4 means fine-tuning '
                     'just the linear head.')
flags.DEFINE_enum('frozen_batch_norm', cfg.FROZEN_BATCH_NORMS[0], list(cfg.FROZEN_BATCH_NORMS),
                  'BN layers of the parts --fine_tune_after_block freezes, in training: '
                  'batch_stats (the original: batch statistics, moving averages keep updating; '
                  'its linear-eval numbers) or moving_stats (inference mode, statistics fixed: '
                  'the features a probe of the checkpoint sees).')
flags.DEFINE_enum('logits_layer_init', 'checkpoint', list(cfg.LOGITS_LAYER_INITS),
                  'Fine-tune/distill start of the supervised head: checkpoint (the original: '
                  'the head --checkpoint holds when its shape fits, else a fresh N(0, 0.01) '
                  'head), zeros (zeroed after the restore), random (always a fresh head).')
flags.DEFINE_bool('zero_init_logits_layer', False,
                  'Accepted for original command lines and, as in the original, without effect '
                  '(its zeroing ran before the head existed); use --logits_layer_init=zeros.')
flags.DEFINE_integer('checkpoint_epochs', 1, 'Number of epochs between checkpoints/summaries.')
flags.DEFINE_integer('checkpoint_steps', 0,
                     'Number of steps between checkpoints/summaries. If provided, overrides '
                     'checkpoint_epochs.')
flags.DEFINE_integer('steps_per_loop', 0,
                     'Steps run inside one tf.function between host-side logs/summaries. '
                     '0: same as the checkpoint interval (the original).')
flags.DEFINE_integer('keep_checkpoint_max', 5, 'Maximum number of checkpoints to keep.')
flags.DEFINE_bool('allow_flag_changes', False,
                  'Resume a training run although flags its checkpoints depend on (train_mode, '
                  'dataset, batch size, optimizer, learning-rate schedule, temperature, '
                  'architecture) differ from its flags.json; the earlier values are kept there '
                  'under "history". Another --optimizer restores weights and step only.')
flags.DEFINE_float('lock_lease_s', cfg.LOCK_LEASE_S,
                   'Lease of model_dir/LOCK in seconds: a training run renews it every loop and '
                   'every lease/4 s; a lock not renewed for this long is taken over, from any '
                   'host (its run is gone).')
# Accepted for command lines written for the original (its README passes it); it has no effect.
flags.DEFINE_integer('train_summary_steps', 0, 'Ignored (kept so original command lines run).')
# The TF1 README's fine-tuning commands pass it; here --fine_tune_after_block decides what trains.
flags.DEFINE_string('variable_schema', None, 'Ignored (TF1 flag); see --fine_tune_after_block.')

# ---- evaluation: Eval, kNN monitor, linear probe, embeddings. ----
flags.DEFINE_integer('eval_steps', 0,
                     'Number of steps to eval for. If not provided, evals over entire dataset.')
flags.DEFINE_integer('eval_batch_size', 256, 'Batch size for eval.')
flags.DEFINE_string('eval_name', None, 'Name for eval (summaries go to model_dir/eval_<name>).')
flags.DEFINE_float('eval_timeout', 3600,
                   '--mode=eval: seconds to wait for each new checkpoint in model_dir before '
                   'stopping (an error if none came at all); 0 waits forever.')
flags.DEFINE_bool('knn_monitor', None,
                  'Weighted kNN accuracy (k nearest train examples by cosine similarity of '
                  'final_avg_pool features) at each eval and every --knn_every_epochs. Unset: on '
                  'when pretraining on a labelled dataset.')
flags.DEFINE_integer('knn_k', 200, 'Neighbours of the kNN monitor (Wu et al. 2018: 200).')
flags.DEFINE_float('knn_temperature', 0.1,
                   'kNN vote weight exp(similarity / T) (Wu et al. 2018: 0.1).')
flags.DEFINE_integer('knn_every_epochs', 10,
                     'Run the kNN monitor every this many training epochs (0: only at evals).')
flags.DEFINE_integer('knn_max_bank_size', 50000,
                     'Train examples read for the kNN bank and the linear probe: a '
                     'class-balanced, seeded subset of at most this many (0: the whole split).')
flags.DEFINE_bool('linear_probe', None,
                  'Logistic-regression probe on frozen final_avg_pool features (L2 strength '
                  'chosen on held-out train examples). Unset: at the end of pretraining with '
                  '--mode=train_then_eval, and in --mode=probe.')
flags.DEFINE_bool('random_init_baseline', False,
                  'Also run the kNN / linear probe on the encoder at its initialisation (same '
                  'seed, no training): the like-for-like baseline (eval/random_init/... keys).')
flags.DEFINE_string('embed_split', None,
                    '--mode=embed: the split whose images are embedded (TFDS slicing works). '
                    'Unset: --train_split.')
flags.DEFINE_string('embed_endpoint', 'final_avg_pool',
                    '--mode=embed: the model endpoint written to features.npy, e.g. '
                    'proj_head_output or block_group4 (flattened).')
flags.DEFINE_string('query', None,
                    '--mode=neighbors: an image file or a folder of images whose nearest images '
                    'of --embed_split are written to neighbors.csv and neighbors.png.')
flags.DEFINE_integer('num_neighbors', 8, '--mode=neighbors: neighbours per query image.')
flags.DEFINE_float('threshold', 0.95,
                   '--mode=duplicates: images whose embeddings have a cosine similarity of at '
                   'least this (in (0, 1]) are near-duplicates; groups are connected components.')
flags.DEFINE_integer('num_preview_images', 6,
                     '--mode=preview_augment: training images shown (the first of the split).')
flags.DEFINE_integer('num_preview_pairs', 3,
                     '--mode=preview_augment: pairs of training views shown per image.')

# ---- export: SavedModel exports. ----
flags.DEFINE_integer('keep_hub_module_max', 1, 'Maximum number of Hub modules to keep.')

# ---- distributed: Devices and strategies. ----
flags.DEFINE_enum('distribution_strategy', 'auto', list(cfg.STRATEGIES),
                  'auto: TPU if configured or found, else MultiWorkerMirrored when TF_CONFIG '
                  'names several workers, else Mirrored over local GPUs, else the default (CPU).')
flags.DEFINE_integer('cpu_devices', 0,
                     'Testing and teaching aid: split the host CPU into this many logical '
                     'devices, so --distribution_strategy=mirrored (or auto on a machine without '
                     'GPUs/TPUs) runs that many replicas on a CPU. 0: one CPU device. Replicas '
                     'share the same cores: no speed-up, but the multi-device code paths run '
                     '(docs/multi_device.md).')

# ---- tpu: Cloud TPUs. ----
flags.DEFINE_bool('use_tpu', None,
                  'Force (True) or rule out (False) a TPU. Unset (default): automatic, see '
                  '--distribution_strategy.')
flags.DEFINE_string('tpu_name', None, 'The Cloud TPU to use (name or grpc:// address).')
flags.DEFINE_string('tpu_zone', None, '[Optional] GCE zone where the Cloud TPU is located.')
flags.DEFINE_string('gcp_project', None, '[Optional] Project name for the Cloud TPU project.')
flags.DEFINE_string('master', None, 'Address/name of the TensorFlow master (TPU) to use.')
flags.DEFINE_bool('allow_local_paths_on_tpu', False,
                  'On a TPU, --model_dir and --data_dir must be gs:// paths (every host reads '
                  'and writes them); set this on a single-host TPU VM to use its local disk.')

# ---- distillation: Teacher and student. ----
flags.DEFINE_string('teacher_checkpoint', None,
                    'Distillation teacher: a fine-tuned checkpoint or model_dir of ours, or an '
                    'exported SavedModel directory.')
flags.DEFINE_float('distill_temperature', 1.0,
                   'Softmax temperature of teacher and student in distillation (SimCLRv2: 0.1 '
                   'for self-distillation, 1.0 for big-to-small).')
flags.DEFINE_enum('distill_loss_scale', cfg.DISTILL_LOSS_SCALES[0], list(cfg.DISTILL_LOSS_SCALES),
                  'none: the distillation loss of SimCLRv2 Eq. 2; t_squared: times '
                  'distill_temperature^2, as the authors\' colab add_kd_loss and Hinton et al. '
                  '(equal at temperature 1).')
flags.DEFINE_float('distill_label_weight', 0.0,
                   'Weight alpha of the label loss on the labelled subset mixed into '
                   'distillation (paper Eq. 3); 0 is pure distillation.')
flags.DEFINE_integer('teacher_resnet_depth', None,
                     'Teacher architecture; unset teacher_* flags are read from the teacher\'s '
                     'flags.json, else they equal the student\'s.')
flags.DEFINE_float('teacher_width_multiplier', None, 'Teacher width multiplier.')
flags.DEFINE_float('teacher_sk_ratio', None, 'Teacher SK ratio.')
flags.DEFINE_float('teacher_se_ratio', None, 'Teacher SE ratio.')
flags.DEFINE_enum('teacher_proj_head_mode', None, list(cfg.PROJ_HEAD_MODES),
                  'Teacher projection head mode.')
flags.DEFINE_enum('teacher_precision', None, list(cfg.PRECISIONS),
                  'Teacher compute precision (default: --precision).')
flags.DEFINE_integer('teacher_num_proj_layers', None, 'Teacher projection head layers.')
flags.DEFINE_integer('teacher_proj_out_dim', None, 'Teacher projection output dimension.')
flags.DEFINE_integer('teacher_ft_proj_selector', None,
                     'Teacher projection head layer that feeds its supervised head.')
