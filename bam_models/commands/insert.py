""" `bam-models insert`: a timm CNN with BAM or CBAM inserted, written as a Hub folder to fine-tune. """
import argparse

from bam_models.commands.options import add_model_option, add_out_option
from bam_models.errors import BamModelsError, PretrainedWeightsError, UsageError
from bam_models.hub import check_model_name, insert_into_folder
from bam_models.insert.inserted import ATTENTIONS


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    try:
        info = insert_into_folder(
            args.model, args.attention, args.out, pretrained=args.pretrained, replace_existing=args.replace_existing)
    except UsageError as e:  # no stage / slot for the attention, or inserted twice: said in the CLI's terms
        raise UsageError(str(e).replace('replace_existing=True', '--replace-existing')) from None
    except BamModelsError:  # the folder is not empty, the download failed: the CLI prints it
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(str(e).rstrip('.').replace('replace_existing=True', '--replace-existing')) from None
    except (RuntimeError, OSError) as e:  # timm found no weights, or could not download them
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedWeightsError(
            f"timm could not load pretrained weights of {args.model} ({first_line}); check the network or "
            f"HF_ENDPOINT, or leave out --pretrained") from None
    print(f"wrote {info['weights']} ({info['num_params']:,} parameters), {info['config']}, {info['readme']}")
    print(f"load it with timm.create_model('local-dir:{args.out}', pretrained=True) after `import bam_models`, "
          f"or fine-tune it with `bam-models train --set model.name=local-dir:{args.out} --set model.pretrained=true`")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'insert', help='add BAM or CBAM to any timm CNN and write it as a Hub folder',
        description='Build timm model MODEL, insert BAM (one after every stage followed by a downsampling) or CBAM '
                    '(in every block attention slot), and write model.safetensors + config.json + README.md to OUT, '
                    "which timm.create_model('local-dir:OUT', pretrained=True) rebuilds once bam_models is imported.")
    add_model_option(parser, "timm model name, optionally with a tag, e.g. convnext_tiny", old_positional=True)
    add_out_option(parser, 'folder to write (new or empty)', old_positional=True)
    parser.add_argument('--attention', choices=ATTENTIONS, default='bam', help='module to insert (default: bam)')
    parser.add_argument('--pretrained', action='store_true',
                        help="start from timm's pretrained weights of MODEL (downloaded by timm); the attention is "
                             "freshly initialised")
    parser.add_argument('--replace-existing', action='store_true',
                        help='with --attention cbam: replace the SE modules a model has with CBAM')
    parser.set_defaults(func=run)
